"""Logins and sessions, as units of work on the database (sync: run through
:meth:`Database.run <visiona_services.api_server.db.Database.run>`).

A login is two steps: :func:`begin_login` keeps the pending login (state, nonce, PKCE
verifier, where to go next) under the hash of a random id that the browser holds in a
signed cookie; :func:`take_pending_login` removes it (single use) for the callback, and
:func:`complete_login` upserts the user, ends the session the browser had (a new id at
every login: no fixation) and starts a new one. Sessions end by idle time, by absolute
age, by logout, and by the provider's back-channel logout.
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import datetime, timedelta

import attrs
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .. import audit
from ..db import LoginSession, PendingLogin, User
from .cookies import id_hash, new_id
from .oidc import Identity, LogoutRequest

__all__ = [
    "Principal",
    "SessionPolicy",
    "begin_login",
    "complete_login",
    "end_provider_sessions",
    "end_session",
    "load_session",
    "take_pending_login",
]


@attrs.frozen
class SessionPolicy:
    idle_timeout: timedelta
    max_age: timedelta
    login_timeout: timedelta

    @property
    def touch_interval(self) -> timedelta:
        """``last_seen_at`` is written at most this often (not on every request)."""
        return min(timedelta(seconds=60), self.idle_timeout / 10)


@attrs.frozen
class Principal:
    """The user behind a valid session."""

    user_id: str
    issuer: str
    email: str | None
    name: str | None
    session_hash: str
    session_expires_at: datetime


def begin_login(
    db: Session, *, next_path: str, policy: SessionPolicy, now: datetime
) -> tuple[str, str, str, str]:
    """Keep a pending login; return ``(login_id, state, nonce, code_verifier)``.

    Expired pending logins are removed on the way (they are never used again).
    """
    db.execute(delete(PendingLogin).where(PendingLogin.expires_at < now))
    login_id, state, nonce, verifier = new_id(), new_id(), new_id(), new_id() + new_id()
    db.add(
        PendingLogin(
            id_hash=id_hash(login_id),
            state=state,
            nonce=nonce,
            code_verifier=verifier,
            next_path=next_path,
            expires_at=now + policy.login_timeout,
        )
    )
    return login_id, state, nonce, verifier


def take_pending_login(db: Session, login_id: str) -> PendingLogin | None:
    """Remove and return the pending login (None if there is none: unknown or used); the
    caller checks that it has not expired (an expired one is removed all the same)."""
    pending = db.get(PendingLogin, id_hash(login_id))
    if pending is None:
        return None
    deleted = db.execute(
        delete(PendingLogin).where(PendingLogin.id_hash == pending.id_hash)
    ).rowcount  # type: ignore[attr-defined]
    if deleted != 1:  # a concurrent callback took it first
        return None
    return pending


def _upsert_user(db: Session, identity: Identity, now: datetime) -> User:
    lookup = select(User).where(User.issuer == identity.issuer, User.subject == identity.subject)
    user = db.scalars(lookup).one_or_none()
    if user is None:
        try:
            with db.begin_nested():  # two first logins at once: one inserts
                user = User(
                    id=uuid.uuid4().hex,
                    issuer=identity.issuer,
                    subject=identity.subject,
                    created_at=now,
                    last_login_at=now,
                )
                db.add(user)
        except IntegrityError:
            user = db.scalars(lookup).one()
    user.email = identity.email
    user.name = identity.name
    user.last_login_at = now
    return user


def complete_login(
    db: Session,
    identity: Identity,
    *,
    previous_session_id: str | None,
    policy: SessionPolicy,
    actor: audit.Actor,
    now: datetime,
) -> str:
    """Upsert the user, end the browser's previous session, start a new one (audited).

    Returns the new session id (for the cookie; only its hash is stored).
    """
    user = _upsert_user(db, identity, now)
    if previous_session_id is not None:
        db.execute(delete(LoginSession).where(LoginSession.id_hash == id_hash(previous_session_id)))
    session_id = new_id()
    db.add(
        LoginSession(
            id_hash=id_hash(session_id),
            user_id=user.id,
            created_at=now,
            last_seen_at=now,
            expires_at=now + policy.max_age,
            oidc_sid=identity.sid,
            client_address=actor.client_address,
        )
    )
    audit.record(db, actor, "auth:login", user_id=user.id, target=f"user:{user.id}")
    return session_id


def load_session(
    db: Session, session_id: str, *, policy: SessionPolicy, now: datetime
) -> Principal | None:
    """The principal of a live session; an expired one is removed and gives None."""
    row = db.execute(
        select(LoginSession, User)
        .join(User, User.id == LoginSession.user_id)
        .where(LoginSession.id_hash == id_hash(session_id))
    ).one_or_none()
    if row is None:
        return None
    session, user = row
    if session.expires_at <= now or session.last_seen_at + policy.idle_timeout <= now:
        db.execute(delete(LoginSession).where(LoginSession.id_hash == session.id_hash))
        return None
    if now - session.last_seen_at >= policy.touch_interval:
        touched = db.execute(
            update(LoginSession)
            .where(LoginSession.id_hash == session.id_hash)
            .values(last_seen_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount  # type: ignore[attr-defined]
        if touched != 1:  # ended meanwhile (logout, back-channel logout)
            return None
    return Principal(
        user_id=user.id,
        issuer=user.issuer,
        email=user.email,
        name=user.name,
        session_hash=session.id_hash,
        session_expires_at=min(session.expires_at, session.last_seen_at + policy.idle_timeout),
    )


def end_session(db: Session, principal: Principal, actor: audit.Actor) -> None:
    """Logout: the session is gone (audited)."""
    db.execute(delete(LoginSession).where(LoginSession.id_hash == principal.session_hash))
    audit.record(db, actor, "auth:logout", target=f"user:{principal.user_id}")


def end_provider_sessions(
    db: Session, issuer: str, request: LogoutRequest, actor: audit.Actor
) -> int:
    """Back-channel logout: end the sessions of the provider session ``sid`` and/or of the
    subject ``sub`` (users of ``issuer`` only); returns how many ended (audited per user)."""
    which = (
        select(LoginSession.id_hash, LoginSession.user_id)
        .join(User, User.id == LoginSession.user_id)
        .where(User.issuer == issuer)
    )
    if request.subject is not None:
        which = which.where(User.subject == request.subject)
    if request.sid is not None:
        which = which.where(LoginSession.oidc_sid == request.sid)
    ended = db.execute(which).all()
    if not ended:
        return 0
    db.execute(delete(LoginSession).where(LoginSession.id_hash.in_([h for h, _ in ended])))
    per_user = Counter(user_id for _, user_id in ended)
    for user_id, count in sorted(per_user.items()):
        audit.record(
            db,
            actor,
            "auth:backchannel_logout",
            user_id=user_id,
            target=f"user:{user_id}",
            detail={"sessions_ended": count, "by": "sid" if request.sid else "sub"},
        )
    return len(ended)
