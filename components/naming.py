"""Names, tags and labels of the resources a fleet creates. Pure: no pulumi import.

This module owns how a resource is named from its component (`f"{name}-asg"`), the cloud name
limits (AWS name prefixes, GCP's 63-character RFC 1035 names, Azure's computer-name prefixes,
Kubernetes DNS-1123 names), and the cost-attribution tags/labels (fleet, pool, model, tenant)
in each cloud's alphabet. Every pool component calls these so that the same fleet gets the same
names and tags whatever cloud it lands on, and Hypothesis can check the limits once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Literal

TagStyle = Literal["aws", "azure", "gcp", "kubernetes"]

# Tag keys per style. AWS and Azure accept ':' in keys (AWS cost-allocation tags are usually
# written `app:thing`); GCP label keys are [a-z0-9_-]; Kubernetes keys take a DNS prefix.
_KEYS: Mapping[TagStyle, Mapping[str, str]] = {
    "aws": {k: f"fleetform:{k}" for k in ("fleet", "pool", "model", "tenant")},
    "azure": {k: f"fleetform:{k}" for k in ("fleet", "pool", "model", "tenant")},
    "gcp": {k: f"fleetform-{k}" for k in ("fleet", "pool", "model", "tenant")},
    "kubernetes": {k: f"fleetform/{k}" for k in ("fleet", "pool", "model", "tenant")},
}

SHARED_TENANT = "shared"  # a pool several tenants may use: the split is in the cost outputs
NO_TENANT = "none"

GCP_LABEL_MAX = 63
K8S_NAME_MAX = 63
K8S_LABEL_VALUE_MAX = 63
AZURE_COMPUTER_PREFIX_MAX = 9  # Linux VMSS: the prefix plus 6 generated characters
AWS_NAME_PREFIX_MAX = 32  # launch templates / IAM names get a random suffix after it
AZURE_NAME_MAX = 80  # load balancers, network security groups

_GCP_LABEL_BAD = re.compile(r"[^a-z0-9_-]+")
_DNS_BAD = re.compile(r"[^a-z0-9-]+")
_K8S_VALUE_BAD = re.compile(r"[^A-Za-z0-9_.-]+")
_AZURE_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


def child_name(component: str, suffix: str) -> str:
    """The logical (Pulumi) name of a component's child: `f"{component}-{suffix}"`."""
    return f"{component}-{suffix}"


def pool_component_name(fleet: str, pool: str) -> str:
    """The pool component's logical name inside a fleet component."""
    return f"{fleet}-{pool}"


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def shorten(text: str, limit: int) -> str:
    """`text` if it fits in `limit`, else a prefix plus a 6-digit hash of the whole: stable and
    still unique for distinct inputs that share a long prefix."""
    if len(text) <= limit:
        return text
    keep = max(limit - 7, 1)
    return f"{text[:keep].rstrip('-')}-{_digest(text, 6)}"[:limit]


def dns_label(text: str, limit: int = K8S_NAME_MAX) -> str:
    """An RFC 1035 label (GCP resource names, Kubernetes object names): lower-case letters,
    digits and '-', starting with a letter, not ending with '-', at most `limit` characters."""
    label = _DNS_BAD.sub("-", text.lower()).strip("-")
    if not label or not label[0].isalpha():
        label = f"f-{label}".rstrip("-")
    label = shorten(label, limit).rstrip("-")
    return label


def gcp_label_value(text: str) -> str:
    """A GCP label value: [a-z0-9_-], at most 63 characters (empty is allowed)."""
    return shorten(_GCP_LABEL_BAD.sub("_", text.lower()), GCP_LABEL_MAX)


def k8s_label_value(text: str) -> str:
    """A Kubernetes label value: alphanumerics with '-', '_', '.' inside, at most 63."""
    value = _K8S_VALUE_BAD.sub("-", text).strip("-_.")
    return shorten(value, K8S_LABEL_VALUE_MAX).strip("-_.")


def azure_computer_prefix(pool: str) -> str:
    """A VMSS computer-name prefix: letters and digits, starting with a letter, short enough
    for Azure's 15-character Linux host names."""
    letters = re.sub(r"[^a-z0-9]", "", pool.lower()) or "node"
    if not letters[0].isalpha():
        letters = f"n{letters}"
    if len(letters) <= AZURE_COMPUTER_PREFIX_MAX:
        return letters
    return letters[: AZURE_COMPUTER_PREFIX_MAX - 3] + _digest(pool, 3)


def azure_name(text: str, limit: int = AZURE_NAME_MAX) -> str:
    """An Azure network resource name (load balancers and the like): letters, digits, '_', '.'
    and '-', starting with a letter or digit, ending with a letter, digit or '_'."""
    name = _AZURE_NAME_BAD.sub("-", text).lstrip("_.-")
    name = shorten(name or "fleetform", limit).rstrip(".-")
    return name or "fleetform"


def tenant_tag(tenants: Iterable[str]) -> str:
    """The `tenant` cost tag of a pool: the tenant when exactly one may use it, `shared` when
    several do (the per-tenant split is the fleet's cost output), `none` when nobody may."""
    names = sorted(set(tenants))
    if not names:
        return NO_TENANT
    return names[0] if len(names) == 1 else SHARED_TENANT


def cost_tags(
    style: TagStyle,
    *,
    fleet: str,
    pool: str,
    model: str,
    tenant: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Cost-attribution tags in `style`'s alphabet. The spec's own pool tags (`extra`) are
    kept, but never override the four attribution keys: cost reports rely on them."""
    keys = _KEYS[style]
    ours = {keys["fleet"]: fleet, keys["pool"]: pool, keys["model"]: model, keys["tenant"]: tenant}
    merged: dict[str, str] = {}
    for key, value in {**(extra or {}), **ours}.items():
        if style == "gcp":
            label_key = gcp_label_value(key).strip("_-") or "tag"
            if not label_key[0].isalpha():
                label_key = f"t{label_key}"
            merged[label_key] = gcp_label_value(value)
        elif style == "kubernetes":
            merged[key] = k8s_label_value(value)
        else:
            merged[key] = value
    if style in ("gcp", "kubernetes"):
        # Sanitised spec tags must not shadow the attribution keys either.
        for key, value in ours.items():
            merged[key] = gcp_label_value(value) if style == "gcp" else k8s_label_value(value)
    return merged


def tag_key(style: TagStyle, what: str) -> str:
    """The key of one attribution tag (`fleet`, `pool`, `model`, `tenant`) in `style`."""
    return _KEYS[style][what]
