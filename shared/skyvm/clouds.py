"""The clouds skyvm knows and the URL schemes of their object stores: the project's one list of each.

Holds ``CLOUDS`` (the clouds a node may name, and the connector types), the names ``infra:`` takes
for them, SkyPilot's names, the clouds a cost plan looks at, and the bucket schemes a payload store
may use with the cloud each belongs to. Settings, payload stores, connectors and the SkyPilot
backend read these; none keeps a list of its own.

May import: the standard library only (everything in skyvm may import this module).
"""

from __future__ import annotations

from typing import Optional

CLOUDS = ("aws", "gcp", "azure", "lambda", "kubernetes")
# What ``infra: CLOUD[/REGION[/ZONE]]`` accepts as CLOUD (SkyPilot's spellings), and the cloud each means.
INFRA_NAMES = {**{cloud: cloud for cloud in CLOUDS}, "k8s": "kubernetes"}
# The cloud as SkyPilot's ``infra`` names it.
SKYPILOT_INFRA = {**{cloud: cloud for cloud in CLOUDS}, "kubernetes": "k8s"}
# The clouds a cost plan compares (Kubernetes has no price catalog).
PLANNING_CLOUDS = tuple(cloud for cloud in CLOUDS if cloud != "kubernetes")

# A payload store's bucket scheme -> the cloud (and so the connector type) that serves it.
BUCKET_SCHEMES = {"s3": "aws", "gs": "gcp", "gcs": "gcp", "az": "azure", "abfs": "azure"}
# The same as URL prefixes (``str.startswith`` takes the tuple), and with a directory's.
BUCKET_PREFIXES = tuple(f"{scheme}://" for scheme in BUCKET_SCHEMES)
STORE_PREFIXES = ("file://", *BUCKET_PREFIXES)


def schemes_of(cloud: str) -> tuple[str, ...]:
    """The bucket schemes of one cloud's object store (``()`` for a cloud without one)."""
    return tuple(scheme for scheme, owner in BUCKET_SCHEMES.items() if owner == cloud)


def cloud_of_url(url: Optional[str]) -> Optional[str]:
    """The cloud whose bucket a URL names (None for a directory, file:// or another scheme)."""
    if not url or "://" not in url:
        return None
    return BUCKET_SCHEMES.get(url.split("://", 1)[0])
