// Dev/test OpenID Connect provider: npm `oidc-provider` (panva) v9 with its built-in
// development login and consent pages. Never for production: any login name signs in, the
// password is ignored, and all state lives in memory.
//
//   npm ci --prefix devidp    (or `make devidp`)
//   PORT=9090 REDIRECT_URIS=http://127.0.0.1:8000/api/auth/callback node devidp/provider.mjs
//
// Environment:
//   PORT                       port to listen on; 0 (the default) picks a free one, and the
//                              ready line tells which
//   HOST                       address to listen on (default 127.0.0.1)
//   ISSUER                     issuer identifier (default http://127.0.0.1:<bound port>)
//   CLIENT_ID                  the one client's id (default visiona-web)
//   CLIENT_SECRET              unset: a public client (token_endpoint_auth_method none);
//                              set: a confidential client (client_secret_basic).
//                              PKCE (S256) is required either way
//   REDIRECT_URIS              comma-separated redirect URIs (required)
//   POST_LOGOUT_REDIRECT_URIS  comma-separated, optional
//   BACKCHANNEL_LOGOUT_URI     optional; registers the client for OIDC back-channel logout
//                              (with backchannel_logout_session_required: logout tokens carry
//                              sid). Loopback URIs are allowed (see `fetch` below)
//   JWKS_FILE                  optional path to JSON {"keys": [private JWKs]} used as the
//                              signing keys (first one signs); default: an RSA key made at start
//   ID_TOKEN_TTL               optional ID token lifetime in seconds (default 3600)
//   COOKIE_KEY                 optional key signing the provider's cookies (default fixed)
//
// Stdout carries one line, `oidc-provider listening on <issuer>`, once requests are served;
// its warnings and errors go to stderr. SIGTERM/SIGINT close it with exit code 0.
import * as crypto from 'node:crypto';
import { readFileSync } from 'node:fs';
import * as http from 'node:http';

// oidc-provider 9 warns at import time that it wants Node 22; it runs on Debian 12's Node 20
// (20.12+ has the crypto.hash it uses), so that one warning is dropped. The import must be
// dynamic to come after the filter.
const warn = console.warn;
console.warn = (...args) => {
  if (!String(args[0]).includes('Unsupported runtime')) warn(...args);
};
// Its notices ("you SHOULD change the default ttl...") go through console.info to stdout,
// which carries the ready line only; they are advice for production setups: dropped.
console.info = () => {};
const { default: Provider } = await import('oidc-provider');

function list(value) {
  return (value || '').split(',').map((item) => item.trim()).filter(Boolean);
}

function signingKeys() {
  if (process.env.JWKS_FILE) {
    return JSON.parse(readFileSync(process.env.JWKS_FILE, 'utf8'));
  }
  // A fresh key per start rather than oidc-provider's built-in dev keys, which are the same
  // for everyone and come with a warning.
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { keys: [{ ...jwk, kid: `dev-${crypto.randomUUID()}`, alg: 'RS256', use: 'sig' }] };
}

const redirectUris = list(process.env.REDIRECT_URIS);
if (!redirectUris.length) {
  console.error('devidp: REDIRECT_URIS is required');
  process.exit(2);
}
const clientSecret = process.env.CLIENT_SECRET || undefined;
const backchannelLogoutUri = process.env.BACKCHANNEL_LOGOUT_URI || undefined;
const jwks = signingKeys();

// Bind first so that PORT=0 works: the issuer holds the port, and the provider needs the
// issuer when it is constructed.
const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject); // EADDRINUSE and the like: exit 1 with the error
  server.listen(Number(process.env.PORT || 0), process.env.HOST || '127.0.0.1', () => {
    server.off('error', reject);
    resolve();
  });
});
const issuer = process.env.ISSUER || `http://127.0.0.1:${server.address().port}`;

const client = {
  client_id: process.env.CLIENT_ID || 'visiona-web',
  redirect_uris: redirectUris,
  post_logout_redirect_uris: list(process.env.POST_LOGOUT_REDIRECT_URIS),
  grant_types: ['authorization_code'],
  response_types: ['code'],
  ...(clientSecret
    ? { client_secret: clientSecret, token_endpoint_auth_method: 'client_secret_basic' }
    : { token_endpoint_auth_method: 'none' }),
  ...(backchannelLogoutUri
    ? {
      backchannel_logout_uri: backchannelLogoutUri,
      backchannel_logout_session_required: true,
    }
    : {}),
};

const provider = new Provider(issuer, {
  clients: [client],
  jwks,
  pkce: { required: () => true }, // S256 is the only method allowed by default
  features: {
    devInteractions: { enabled: true }, // built-in login and consent HTML forms
    rpInitiatedLogout: { enabled: true }, // end_session_endpoint with a confirmation form
    backchannelLogout: { enabled: Boolean(backchannelLogoutUri) },
  },
  scopes: ['openid', 'email', 'profile'],
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'] },
  // By default the scopes' claims go to the userinfo endpoint only once an access token is
  // issued; a BFF reads them from the ID token, as hosted providers send them.
  conformIdTokenClaims: false,
  async findAccount(ctx, id) { // any login name is an account; the password is ignored
    return {
      accountId: id,
      async claims() {
        return { sub: id, email: `${id}@example.test`, email_verified: true, name: id };
      },
    };
  },
  ...(process.env.ID_TOKEN_TTL ? { ttl: { IdToken: Number(process.env.ID_TOKEN_TTL) } } : {}),
  cookies: { keys: [process.env.COOKIE_KEY || 'devidp-test-only-cookie-key'] },
  // oidc-provider's outgoing requests (here: the back-channel logout POST) go through a
  // dispatcher that drops connections to special-use addresses, loopback included, against
  // SSRF. The only outgoing request this provider makes is to the configured
  // BACKCHANNEL_LOGOUT_URI, which in tests is on 127.0.0.1: send that one without it.
  fetch(url, options) {
    if (backchannelLogoutUri && new URL(url).origin === new URL(backchannelLogoutUri).origin) {
      const { dispatcher, ...direct } = options;
      return globalThis.fetch(url, direct);
    }
    return globalThis.fetch(url, options);
  },
});
provider.proxy = false;

// oidc-provider puts `sid` in ID tokens only for clients registered for back-channel logout
// with backchannel_logout_session_required (or when the claims parameter asks for it).
// Keycloak and Auth0 send it always, and a relying party keys its sessions on it for
// back-channel logout: so the dev provider always sends it too.
provider.Client.prototype.includeSid = () => true;

provider.on('backchannel.error', (ctx, error, logoutClient, accountId, sid) => {
  console.error(`devidp: back-channel logout to ${logoutClient.backchannelLogoutUri} failed`
    + ` (sub ${accountId}, sid ${sid}): ${error.message}${error.cause ? `: ${error.cause}` : ''}`);
});
provider.on('server_error', (ctx, error) => {
  console.error('devidp: server error', error);
});

server.on('request', provider.callback());
console.log(`oidc-provider listening on ${issuer}`);

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections(); // keep-alive connections would hold close() open
}
process.once('SIGTERM', shutdown);
process.once('SIGINT', shutdown);
