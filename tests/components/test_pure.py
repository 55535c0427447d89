"""Property and example tests of the pure planning modules (naming, plan, userdata, settings):
no Pulumi involved."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from components import naming
from components.plan import (
    aws_ami_parameter,
    aws_arch,
    fleet_cost_summary,
    gcp_scheduling,
    key_digests,
    market_groups,
    plan_pool,
    tenant_quota,
    with_key_digests,
)
from components.settings import AgentSettings, SettingsError, parse_network, settings_from_config
from components.userdata import cloud_config, node_config_data, render_user_data
from runtime.agent.config import hash_api_key
from runtime.catalog import default_catalog
from runtime.plan import fleet_cost
from runtime.spec import PoolSpec, ServesSpec

from .support import DEV_ENV, PROD_KEYS, cloud_init_schema, load_stack

_prod_spec = functools.cache(lambda: load_stack("Pulumi.prod.yaml")[0])
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=120)
NAMES = st.from_regex(r"[a-z][a-z0-9-]{0,39}", fullmatch=True)


@given(TEXT, st.integers(min_value=8, max_value=63))
def test_dns_labels_are_valid_and_bounded(text: str, limit: int) -> None:
    label = naming.dns_label(text, limit)
    assert re.fullmatch(r"[a-z]([a-z0-9-]*[a-z0-9])?", label), label
    assert len(label) <= limit


@given(st.text(min_size=70, max_size=120), st.text(min_size=70, max_size=120))
def test_shortened_names_stay_distinct(a: str, b: str) -> None:
    """Names past the limit keep a hash of the whole: two long names that share their first 33
    characters still differ."""
    if a != b:
        assert naming.shorten(a, 40) != naming.shorten(b, 40)
    assert len(naming.shorten(a, 40)) <= 40


@given(TEXT)
def test_label_values_fit_gcp_and_kubernetes(text: str) -> None:
    gcp = naming.gcp_label_value(text)
    assert re.fullmatch(r"[a-z0-9_-]*", gcp) and len(gcp) <= 63
    k8s = naming.k8s_label_value(text)
    assert len(k8s) <= 63
    assert k8s == "" or re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?", k8s), k8s


@given(NAMES)
def test_azure_computer_prefixes_are_short_alphanumerics(pool: str) -> None:
    prefix = naming.azure_computer_prefix(pool)
    assert re.fullmatch(r"[a-z][a-z0-9]{0,8}", prefix), prefix


@given(NAMES, NAMES, NAMES, st.lists(NAMES, max_size=4), st.dictionaries(TEXT, TEXT, max_size=4))
def test_attribution_tags_survive_any_pool_tags(
    fleet: str, pool: str, model: str, tenants: list[str], extra: dict[str, str]
) -> None:
    tenant = naming.tenant_tag(tenants)
    assert tenant == ("none" if not tenants else tenants[0] if len(set(tenants)) == 1 else "shared")
    for style in ("aws", "azure", "gcp", "kubernetes"):
        tags = naming.cost_tags(
            style, fleet=fleet, pool=pool, model=model, tenant=tenant, extra=extra
        )
        # GCP and Kubernetes values are the names in their alphabets (a label value cannot end
        # in '-'); AWS and Azure keep them as they are.
        value = {"gcp": naming.gcp_label_value, "kubernetes": naming.k8s_label_value}.get(
            style, str
        )
        assert tags[naming.tag_key(style, "pool")] == value(pool)
        assert tags[naming.tag_key(style, "fleet")] == value(fleet)
        assert tags[naming.tag_key(style, "model")] == value(model)
        assert tags[naming.tag_key(style, "tenant")] == value(tenant)
        if style == "gcp":
            assert all(re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", k) for k in tags), tags


@st.composite
def pools(draw: st.DrawFn) -> PoolSpec:
    low = draw(st.integers(0, 20))
    high = draw(st.integers(low, 40))
    desired = draw(st.integers(low, high))
    spot = draw(st.booleans())
    base = draw(st.integers(0, high)) if spot else 0
    return PoolSpec(
        name="p",
        cloud="gcp",
        region="us-central1",
        instance_type="g2-standard-8",
        spot=spot,
        on_demand_base=base,
        min_replicas=low,
        max_replicas=high,
        desired_replicas=desired,
        serves=ServesSpec(model="m", variant="v"),
    )


@given(pools(), st.booleans())
def test_market_groups_split_replicas_within_bounds(pool: PoolSpec, native_mix: bool) -> None:
    groups = market_groups(pool, native_mix=native_mix)
    assert sum(g.size for g in groups) == pool.replicas
    assert sum(g.max_size for g in groups) == pool.max_replicas
    assert sum(g.min_size for g in groups) <= pool.min_replicas
    for group in groups:
        assert 0 <= group.min_size <= group.size <= group.max_size
    on_demand = sum(g.size for g in groups if not g.spot)
    if pool.spot and not native_mix:
        assert on_demand == min(pool.on_demand_base, pool.replicas)
    if not pool.spot:
        assert [g.spot for g in groups] == [False]
    if native_mix:
        assert len(groups) == 1


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["aws-use1-a10g", "k8s-eks-l4", "gcp-usc1-l4-spot"]), st.integers(0, 6)
    )
)
def test_costs_split_into_on_demand_and_spot_and_match_the_plan(replicas: dict[str, int]) -> None:
    spec = _prod_spec()
    bounded = {
        name: min(max(count, spec.pool(name).min_replicas), spec.pool(name).max_replicas)
        for name, count in replicas.items()
    }
    spec = spec.with_replicas(bounded)
    catalog = default_catalog()
    summary = fleet_cost_summary(spec, catalog)
    cost = fleet_cost(spec, catalog)
    assert summary.total_usd_per_hour == cost.total_usd_per_hour
    for pool, plan_cost in zip(summary.pools, cost.pools, strict=True):
        assert pool.usd_per_hour == plan_cost.usd_per_hour
        assert pool.on_demand_usd_per_hour + pool.spot_usd_per_hour == pytest.approx(
            plan_cost.usd_per_hour
        )
        assert pool.on_demand_usd_per_hour >= 0 and pool.spot_usd_per_hour >= -1e-9


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 200_000), st.integers(0, 6))
def test_tenant_accelerator_quota_is_capped_by_accelerator_hours(
    hours: int, max_replicas: int
) -> None:
    spec = _prod_spec()
    pools = [
        p.model_copy(
            update={"max_replicas": max_replicas, "min_replicas": 0, "desired_replicas": 0}
        )
        if p.name == "k8s-eks-l4"
        else p
        for p in spec.pools
    ]
    search = spec.tenant("search")
    quotas = search.quotas.model_copy(update={"accelerator_hours_per_month": float(hours)})
    tenants = [search.model_copy(update={"quotas": quotas}), *spec.tenants[1:]]
    spec = spec.model_copy(update={"pools": pools, "tenants": tenants})
    quota = tenant_quota(spec, "search", "eks-prod-use1", default_catalog())
    assert quota.accelerators["nvidia.com/gpu"] == min(max_replicas, math.ceil(hours / 730))
    assert quota.accelerators["aws.amazon.com/neuron"] == 0
    assert quota.cpu_millicores == 3400 * max_replicas


def test_hardware_choices() -> None:
    catalog = default_catalog()
    assert aws_arch("m7g.8xlarge") == aws_arch("c7gn.large") == aws_arch("g5g.xlarge") == "arm64"
    assert aws_arch("g5.xlarge") == aws_arch("inf2.xlarge") == aws_arch("g4dn.xlarge") == "x86_64"
    assert aws_ami_parameter(catalog.get("aws", "us-east-1", "trn1.2xlarge")) == (
        "/aws/service/neuron/dlami/multi-framework/ubuntu-24.04/latest/image_id"
    )
    assert gcp_scheduling(spot=False, has_accelerator=False) == {
        "on_host_maintenance": "MIGRATE",
        "automatic_restart": True,
        "provisioning_model": "STANDARD",
        "preemptible": False,
    }


def test_key_digests_replace_every_reference() -> None:
    spec, _ = load_stack("Pulumi.prod.yaml")
    digests = key_digests(spec, PROD_KEYS)
    digested = with_key_digests(spec, digests)
    assert [t.api_keys for t in digested.tenants] == [
        [f"sha256:{hash_api_key(PROD_KEYS[r])}" for r in t.api_keys] for t in spec.tenants
    ]
    dev, _ = load_stack("Pulumi.dev.yaml")
    assert key_digests(dev, {}, DEV_ENV) == {
        "env:FLEETFORM_KEY_APP_TEAM": hash_api_key("dev-key-app"),
        "env:FLEETFORM_KEY_DATA_TEAM": hash_api_key("dev-key-data"),
    }


def test_user_data_validates_and_a_broken_document_does_not(tmp_path: Path) -> None:
    spec, settings_ = load_stack("Pulumi.dev.yaml")
    catalog = default_catalog()
    digested = with_key_digests(spec, key_digests(spec, {}, DEV_ENV))
    node = node_config_data(
        digested, "aws-cpu", agent=settings_.agent, controller_url=None, catalog=catalog
    )
    assert node["controller_url"] is None and node["fleet_token_env"] is None
    document = cloud_config(node, provider="aws", agent=AgentSettings(), fleet_token=None)
    text = render_user_data(document)
    assert text.startswith("#cloud-config\n")
    result = cloud_init_schema(text, tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "/etc/fleetform/agent.env" not in {f["path"] for f in document["write_files"]}
    assert json.loads(document["write_files"][0]["content"])["pool"] == "aws-cpu"
    # Negative control: the validator catches a wrong type.
    broken = yaml.safe_load(text)
    broken["write_files"][0]["defer"] = "later"
    result = cloud_init_schema(render_user_data(broken), tmp_path)
    assert result.returncode == 1
    assert "write_files.0.defer: 'later' is not of type 'boolean'" in result.stderr


def test_settings_errors_name_the_config_path() -> None:
    with pytest.raises(SettingsError) as error:
        parse_network({"fleet_cidrs": ["10.0.0.0/33"]})
    assert str(error.value) == (
        "fleetform:network.fleet_cidrs[0]: '10.0.0.0/33' does not appear to be an IPv4 or IPv6 "
        "network"
    )
    with pytest.raises(SettingsError) as error:
        parse_network({"aws": {"us-east-1": {"vpc_id": "vpc-1"}}})
    assert str(error.value) == "fleetform:network.aws.us-east-1.subnet_ids: required"
    with pytest.raises(SettingsError) as error:
        settings_from_config({"fleetform:agent": {"prot": 1}})
    assert str(error.value).startswith("fleetform:agent.prot: unknown key")


def test_pool_plan_of_a_neuron_pool() -> None:
    spec, _ = load_stack("Pulumi.prod.yaml")
    plan = plan_pool(spec, spec.pool("aws-usw2-inf2"), default_catalog())
    assert (plan.family, plan.accelerators, plan.accelerator_resource) == (
        "neuron",
        1,
        "aws.amazon.com/neuron",
    )
    assert plan.tenants == ("search", "support-bot", "code-assist")
