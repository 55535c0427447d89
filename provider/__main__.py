"""Entry point of the fleetform component provider (run by Pulumi as a plugin, see
PulumiPlugin.yaml): hosts `InferenceFleet` as `fleetform:index:InferenceFleet`."""

from fleetform_component import InferenceFleet  # this folder is on sys.path when run as a plugin
from pulumi.provider.experimental import component_provider_host

PROVIDER_NAME = "fleetform"
PROVIDER_VERSION = "0.1.0"

if __name__ == "__main__":
    component_provider_host(
        components=[InferenceFleet], name=PROVIDER_NAME, version=PROVIDER_VERSION
    )
