"""A headless browser for the dev identity provider (``devidp/``): an ``httpx.AsyncClient``
with its cookie jar driving the provider's development login, consent and logout pages,
as a person would. ``make run`` logs its demo user in with it; the tests use it too."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Protocol
from urllib.parse import urljoin, urlsplit

import attrs
import httpx

__all__ = ["ProviderFlowError", "login_at_provider", "logout_at_provider"]

#: Requests a login or logout may take before it is considered stuck in a loop.
MAX_STEPS = 12


class ProviderFlowError(Exception):
    """A login or logout at the provider did not go as its pages should."""


class Provider(Protocol):
    """Where a provider is and which client asks (``tests.support.oidcprovider``'s handle)."""

    @property
    def discovery_url(self) -> str: ...

    @property
    def client_id(self) -> str: ...


# -- the browser's side -----------------------------------------------------------------------


@attrs.frozen
class _Form:
    action: str
    fields: dict[str, str]


class _PageParser(HTMLParser):
    """The forms (action and hidden inputs) and link targets of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[_Form] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.forms.append(_Form(found.get("action", ""), {}))
        elif tag == "input" and self.forms and found.get("type") == "hidden":
            self.forms[-1].fields[found.get("name", "")] = found.get("value", "")
        elif tag == "a" and "href" in found:
            self.links.append(found["href"])


def _parse_page(response: httpx.Response) -> _PageParser:
    parser = _PageParser()
    parser.feed(response.text)
    parser.close()
    return parser


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _unexpected(what: str, response: httpx.Response) -> ProviderFlowError:
    return ProviderFlowError(
        f"{what}: {response.request.method} {response.url} answered {response.status_code}: "
        f"{response.text[:500]!r}"
    )


async def login_at_provider(
    browser: httpx.AsyncClient,
    authorize_url: str,
    username: str,
    *,
    consent: bool = True,
    password: str = "any-password",
) -> str:
    """Log ``username`` in at the provider, starting from its authorization URL, as a browser
    would: the login form (skipped while the browser has a provider session), the consent
    form (skipped once granted; ``consent=False`` cancels there, so the result carries
    ``error=access_denied``). Returns the URL the provider redirects to at the relying party
    (``code``, ``state``, ``iss``) without requesting it. ``browser`` keeps the provider's
    cookies (its session: a later login by the same browser skips the form)."""
    provider_origin = _origin(authorize_url)
    response = await browser.get(authorize_url, follow_redirects=False)
    for _ in range(MAX_STEPS):
        if response.is_redirect:
            location = urljoin(str(response.url), response.headers["location"])
            if _origin(location) != provider_origin:
                return location
            response = await browser.get(location, follow_redirects=False)
        elif response.status_code == 200:
            page = _parse_page(response)
            prompts = {form.fields.get("prompt"): form for form in page.forms}
            if "login" in prompts:
                form = prompts["login"]
                fields = {**form.fields, "login": username, "password": password}
                response = await browser.post(
                    urljoin(str(response.url), form.action), data=fields, follow_redirects=False
                )
            elif "consent" in prompts and consent:
                form = prompts["consent"]
                response = await browser.post(
                    urljoin(str(response.url), form.action),
                    data=form.fields,
                    follow_redirects=False,
                )
            elif "consent" in prompts:
                cancel = next((link for link in page.links if link.endswith("/abort")), None)
                if cancel is None:
                    raise _unexpected("no cancel link on the consent page", response)
                response = await browser.get(
                    urljoin(str(response.url), cancel), follow_redirects=False
                )
            else:
                raise _unexpected("no login or consent form", response)
        else:
            raise _unexpected("login at the provider failed", response)
    raise ProviderFlowError(f"login did not leave the provider in {MAX_STEPS} requests")


async def logout_at_provider(
    browser: httpx.AsyncClient,
    provider: Provider,
    *,
    id_token_hint: str | None = None,
    client_id: str | None = None,
    post_logout_redirect_uri: str | None = None,
) -> str:
    """RP-initiated logout at the provider's end_session endpoint, confirming its "sign out?"
    form: the provider ends its session and, before it answers the confirmation, POSTs a
    logout token to the back-channel logout URI of each client of the session. Returns where
    the provider then sends the browser (``post_logout_redirect_uri``, or its own success
    page), without requesting it."""
    metadata = (
        (await browser.get(provider.discovery_url, follow_redirects=False))
        .raise_for_status()
        .json()
    )
    params = {"client_id": client_id or provider.client_id}
    if id_token_hint is not None:
        params["id_token_hint"] = id_token_hint
    if post_logout_redirect_uri is not None:
        params["post_logout_redirect_uri"] = post_logout_redirect_uri
    response = await browser.get(
        metadata["end_session_endpoint"], params=params, follow_redirects=False
    )
    if response.status_code != 200:
        raise _unexpected("end_session refused", response)
    forms = [form for form in _parse_page(response).forms if "xsrf" in form.fields]
    if not forms:
        raise _unexpected("no logout confirmation form", response)
    # The "Yes, sign me out" button is outside the form (form="op.logoutForm"): its
    # logout=yes is what makes the provider end the whole session.
    fields = {**forms[0].fields, "logout": "yes"}
    response = await browser.post(
        urljoin(str(response.url), forms[0].action), data=fields, follow_redirects=False
    )
    if not response.is_redirect:
        raise _unexpected("logout confirmation failed", response)
    return urljoin(str(response.url), response.headers["location"])
