"""Clusters: a user's named groups of their own devices."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from . import audit
from .audit import iso
from .db import Cluster, ClusterMember, Device
from .devices import DEVICE_NOT_FOUND
from .errors import NotFound
from .tenancy import owned

__all__ = ["create_cluster", "delete_cluster", "get_cluster", "list_clusters", "update_cluster"]

CLUSTER_NOT_FOUND = "CLUSTER_NOT_FOUND"


def _members(db: Session, cluster_id: str) -> list[str]:
    return list(
        db.scalars(
            select(ClusterMember.device_id)
            .where(ClusterMember.cluster_id == cluster_id)
            .order_by(ClusterMember.device_id)
        )
    )


def _cluster_json(db: Session, cluster: Cluster) -> dict[str, Any]:
    return {
        "id": cluster.id,
        "name": cluster.name,
        "created_at": iso(cluster.created_at),
        "device_ids": _members(db, cluster.id),
    }


def _set_members(db: Session, cluster: Cluster, device_ids: list[str]) -> None:
    """Only the owner's devices may be members; another user's id is unknown here."""
    wanted = sorted(set(device_ids))
    found = set(
        db.scalars(
            select(Device.id).where(Device.id.in_(wanted), Device.user_id == cluster.user_id)
        )
    )
    missing = [device_id for device_id in wanted if device_id not in found]
    if missing:
        raise NotFound(f"no such device: {missing[0]}", DEVICE_NOT_FOUND)
    db.execute(delete(ClusterMember).where(ClusterMember.cluster_id == cluster.id))
    db.add_all(ClusterMember(cluster_id=cluster.id, device_id=device_id) for device_id in wanted)


def list_clusters(db: Session, *, user_id: str) -> list[dict[str, Any]]:
    rows = db.scalars(
        select(Cluster).where(Cluster.user_id == user_id).order_by(Cluster.created_at, Cluster.id)
    )
    return [_cluster_json(db, row) for row in rows]


def get_cluster(db: Session, *, user_id: str, cluster_id: str) -> dict[str, Any]:
    return _cluster_json(db, owned(db, Cluster, cluster_id, user_id, CLUSTER_NOT_FOUND))


def create_cluster(
    db: Session,
    *,
    user_id: str,
    name: str,
    device_ids: list[str],
    now: datetime,
    actor: audit.Actor,
) -> dict[str, Any]:
    cluster = Cluster(id=uuid.uuid4().hex, user_id=user_id, name=name, created_at=now)
    db.add(cluster)
    db.flush()
    _set_members(db, cluster, device_ids)
    audit.record(db, actor, "cluster:create", target=f"cluster:{cluster.id}")
    return _cluster_json(db, cluster)


def update_cluster(
    db: Session,
    *,
    user_id: str,
    cluster_id: str,
    name: str | None,
    device_ids: list[str] | None,
    actor: audit.Actor,
) -> dict[str, Any]:
    cluster = owned(db, Cluster, cluster_id, user_id, CLUSTER_NOT_FOUND)
    if name is not None:
        cluster.name = name
    if device_ids is not None:
        _set_members(db, cluster, device_ids)
    audit.record(db, actor, "cluster:update", target=f"cluster:{cluster.id}")
    return _cluster_json(db, cluster)


def delete_cluster(db: Session, *, user_id: str, cluster_id: str, actor: audit.Actor) -> None:
    cluster = owned(db, Cluster, cluster_id, user_id, CLUSTER_NOT_FOUND)
    db.execute(delete(Cluster).where(Cluster.id == cluster.id))
    audit.record(db, actor, "cluster:delete", target=f"cluster:{cluster.id}")
