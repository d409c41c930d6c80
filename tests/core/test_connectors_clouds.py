"""The GCP, Azure, Lambda and Kubernetes connectors over real protocols on loopback, with the real SDKs.

- A local OAuth server (http.server, plain and TLS) answers what google-auth, msal and the
  connectors ask: Google's token endpoint (JWT-bearer assertions verified against the key's
  public half, refresh tokens), STS token exchange, IAM Credentials generateAccessToken,
  tokeninfo; Microsoft Entra's OpenID configuration and client-credentials token; ACR's
  /oauth2/exchange; Lambda's instance-types.
- Azurite (the `azurite` fixture) for storage keys, connection strings and SAS; the GCS
  emulator (`gcs_server`) for gcsfs through an emulator.

Every secret is a unique marker; each test asserts it is redacted once resolved.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import ssl
import stat
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlparse

import pytest

from skyvm import redact
from skyvm.connectors import CREDENTIALS, ConnectorError, parse_connector
from skyvm.connectors import azure as azure_module
from skyvm.connectors import refs
from skyvm.connectors import gcp as gcp_module
from skyvm.errors import SettingsError

PROJECT = "skyvm-proj"
SA_EMAIL = f"runner@{PROJECT}.iam.gserviceaccount.com"
TARGET = f"deployer@{PROJECT}.iam.gserviceaccount.com"
TENANT = "0e5f9c7a-tenant"
HOME_DIRS = (".config/gcloud", ".azure", ".lambda_cloud", ".kube")


def marker(what: str) -> str:
    return f"skyvm-{what}-{uuid.uuid4().hex}"


def fake_jwt(claims: dict[str, Any]) -> str:
    """A JWT-shaped token (unsigned): what Entra's access tokens look like to a client."""
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")  # noqa: E731
    return f"{enc({'alg': 'none', 'typ': 'JWT'})}.{enc(claims)}.{uuid.uuid4().hex}"


def conn(kind: str, method: str, name: str = "team", **fields):
    return parse_connector(name, {"type": kind, "method": method, **fields}, f"connectors.{name}")


# -- the local OAuth server ------------------------------------------------------


class AuthServer:
    """One loopback server answering Google's, Microsoft's, ACR's and Lambda's token protocols."""

    def __init__(self, tls_cert: Optional[tuple[Path, Path]] = None):
        self.calls: list[dict[str, Any]] = []
        self.sa_keys: dict[str, Any] = {}  # service account email -> public key
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> user email
        self.clients: dict[str, str] = {}  # Entra client id -> secret
        self.tokens: dict[str, tuple[str, float]] = {}  # issued access token -> (who, expires at)
        self.expires_in = 3600
        self.lambda_key: Optional[str] = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urlparse(self.path)
                call = {"method": "GET", "path": url.path, "query": {k: v[0] for k, v in parse_qs(url.query).items()}, "headers": {k.lower(): v for k, v in self.headers.items()}}
                server.calls.append(call)
                self._answer(server.get, call)

            def do_POST(self):
                url = urlparse(self.path)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                body = json.loads(raw) if self.headers.get("Content-Type", "").startswith("application/json") else {k: v[0] for k, v in parse_qs(raw).items()}
                call = {"method": "POST", "path": url.path, "body": body, "headers": {k.lower(): v for k, v in self.headers.items()}}
                server.calls.append(call)
                self._answer(server.post, call)

            def _answer(self, route, call):
                try:
                    self._reply(*route(call))
                except Exception as exc:  # noqa: BLE001 - a test server's bug is a 500, not a dropped connection
                    self._reply(500, {"error": "server_error", "error_description": repr(exc)})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls_cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls_cert)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def issue(self, who: str, prefix: str = "ya29.") -> tuple[str, int]:
        token = prefix + uuid.uuid4().hex
        self.tokens[token] = (who, time.time() + self.expires_in)
        return token, self.expires_in

    def bearer(self, call) -> Optional[str]:
        token = call["headers"].get("authorization", "").removeprefix("Bearer ")
        return self.tokens.get(token, (None,))[0]

    def of(self, path: str) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["path"] == path]

    # -- GET
    def get(self, call) -> tuple[int, dict]:
        path = call["path"]
        if path == "/tokeninfo":
            who, expires = self.tokens.get(call["query"].get("access_token", ""), (None, 0))
            if who is None:
                return 400, {"error": "invalid_token", "error_description": "Invalid Value"}
            return 200, {"email": who, "expires_in": str(max(0, int(expires - time.time()))), "scope": gcp_module.CLOUD_PLATFORM}
        if path.endswith("/.well-known/openid-configuration"):
            tenant = path.strip("/").split("/")[0]
            base = f"{self.url}/{tenant}"
            return 200, {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "issuer": f"{base}/v2.0",
                "tenant_region_scope": "EU",
            }
        if path == "/api/v1/instance-types":
            if call["headers"].get("authorization") != f"Bearer {self.lambda_key}":
                return 401, {"error": {"code": "global/invalid-api-key", "message": "API key was invalid, expired, or deleted."}}
            return 200, {"data": {"gpu_1x_a10": {}, "gpu_8x_h100_sxm5": {}}}
        return 404, {"error": f"no route {path}"}

    # -- POST
    def post(self, call) -> tuple[int, dict]:
        import jwt

        path, body = call["path"], call["body"]
        grant = body.get("grant_type") if isinstance(body, dict) else None
        if path == "/token" and grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            claims = jwt.decode(body["assertion"], options={"verify_signature": False})
            key = self.sa_keys.get(claims.get("iss"))
            if key is None:
                return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
            # google-auth's assertions are addressed to Google's token endpoint, whatever token_uri says.
            claims = jwt.decode(body["assertion"], key, algorithms=["RS256"], audience=gcp_module.GOOGLE_TOKEN_URI)
            token, expires_in = self.issue(claims["iss"])
            return 200, {"access_token": token, "expires_in": expires_in, "token_type": "Bearer"}
        if path == "/token" and grant == "refresh_token":
            who = self.refresh_tokens.get(body.get("refresh_token"))
            if who is None:
                return 400, {"error": "invalid_grant", "error_description": "Token has been expired or revoked."}
            token, expires_in = self.issue(who)
            return 200, {"access_token": token, "expires_in": expires_in, "token_type": "Bearer"}
        if path == "/v1/token" and grant == "urn:ietf:params:oauth:grant-type:token-exchange":
            who = self.tokens.get(body.get("subject_token"), (None,))[0]
            if who is None:
                return 400, {"error": "invalid_grant", "error_description": "The subject token is invalid."}
            token, expires_in = self.issue(f"downscoped:{who}", prefix="ya29.d.")
            return 200, {"access_token": token, "expires_in": expires_in, "issued_token_type": "urn:ietf:params:oauth:token-type:access_token", "token_type": "Bearer"}
        if path.endswith(":generateAccessToken"):
            target = path.rsplit("/", 1)[1].removesuffix(":generateAccessToken")
            if self.bearer(call) is None:
                return 401, {"error": {"code": 401, "message": "Request had invalid authentication credentials."}}
            token, expires_in = self.issue(target)
            expire = datetime.datetime.fromtimestamp(time.time() + expires_in, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            return 200, {"accessToken": token, "expireTime": expire}
        if path.endswith("/oauth2/v2.0/token") and grant == "client_credentials":
            tenant = path.strip("/").split("/")[0]
            if self.clients.get(body.get("client_id")) != body.get("client_secret"):
                return 401, {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."}
            now = int(time.time())
            claims = {"aud": body.get("scope", "").removesuffix("/.default"), "iss": f"https://sts.windows.net/{tenant}/", "tid": tenant,
                      "appid": body["client_id"], "oid": body["client_id"], "iat": now - 60, "nbf": now - 60, "exp": now + self.expires_in}
            token = fake_jwt(claims)
            self.tokens[token] = (body["client_id"], claims["exp"])
            return 200, {"token_type": "Bearer", "expires_in": self.expires_in, "ext_expires_in": self.expires_in, "access_token": token}
        if path == "/oauth2/exchange" and grant == "access_token":
            if body.get("access_token") not in self.tokens:
                return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "invalid access token"}]}
            return 200, {"refresh_token": "acr-refresh-" + uuid.uuid4().hex}
        return 404, {"error": f"no route {path}"}


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A CA-flagged certificate for 127.0.0.1 (Microsoft's authority must be https)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def oauth():
    server = AuthServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oauth_tls(tmp_path_factory):
    cert = self_signed_cert(tmp_path_factory.mktemp("tls"))
    server = AuthServer(tls_cert=cert)
    server.ca_bundle, server.key_file = str(cert[0]), str(cert[1])
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """No cached credentials across tests; no emulator variable unless a test asks for the emulator."""
    CREDENTIALS.clear()
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)


def _tree(path: Path):
    if not path.exists():
        return None
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in [path, *path.rglob("*")])


@pytest.fixture
def home_untouched():
    """The user's own credential folders are the same after the test as before."""
    home = Path(os.path.expanduser("~"))
    before = {d: _tree(home / d) for d in HOME_DIRS}
    yield
    assert {d: _tree(home / d) for d in HOME_DIRS} == before


@pytest.fixture
def private(tmp_path):
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    return folder


def assert_private_files(env: dict[str, str], folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        path = Path(env[name])
        assert path.is_relative_to(folder), f"{name}={path} is outside the private folder"
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- Google ----------------------------------------------------------------------


def service_account_key(server: AuthServer, email: str = SA_EMAIL) -> dict[str, Any]:
    """A real RSA service-account key whose token_uri is the local server; the server knows its public half."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server.sa_keys[email] = key.public_key()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    return {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": marker("key-id"),
        "private_key": pem,
        "client_email": email,
        "client_id": "1234567890",
        "token_uri": f"{server.url}/token",
    }


@pytest.fixture
def sa_key(oauth, monkeypatch):
    """A service-account key behind an env: reference (a variable of its own: no cache is shared)."""
    key = service_account_key(oauth)
    var = "SA_JSON_" + uuid.uuid4().hex[:8].upper()
    monkeypatch.setenv(var, json.dumps(key))
    key["ref"] = f"env:{var}"
    return key


def gcp_sa(sa_key, oauth, **fields):
    return conn("gcp", "service-account", service_account_json=sa_key["ref"], sts_endpoint=f"{oauth.url}/v1/token", tokeninfo_endpoint=f"{oauth.url}/tokeninfo", **fields)


@pytest.mark.parametrize(
    "method,fields,fragment",
    [
        ("service-account", {}, "method service-account needs service_account_json"),
        ("user-account", {}, "method user-account needs user_account_json"),
        ("oauth2-token", {}, "method oauth2-token needs token"),
        ("impersonation", {}, "method impersonation needs target_principal"),
        ("impersonation", {"target_principal": "deployer"}, "target_principal takes a service account's email"),
        ("service-account", {"service_account_json": '{"type": "service_account"}'}, "does not start with a known reference scheme"),
        ("service-account", {"service_account_json": "file:/k.json", "user_account_json": "file:/u.json"}, "user_account_json is for method user-account"),
        ("service-account", {"service_account_json": "file:/k.json", "credentials": "airflow:gcp"}, "not both"),
        ("implicit", {"token": "env:T"}, "token is for method oauth2-token"),
        ("implicit", {"scopes": ["cloud-platform"]}, "scopes are OAuth scope URLs"),
        ("impersonation", {"target_principal": TARGET, "lifetime_s": 50000}, "lifetime_s"),
    ],
)
def test_gcp_settings_errors_name_the_method_and_the_field(method, fields, fragment):
    with pytest.raises(SettingsError) as err:
        conn("gcp", method, **fields)
    assert fragment in str(err.value) and "connectors.team" in str(err.value)


def test_gcp_service_account_proves_its_identity_through_the_token_endpoint(oauth, sa_key):
    c = gcp_sa(sa_key, oauth)
    said = c.identity()
    assert said.startswith(f"{SA_EMAIL} (project {PROJECT}); token valid until ")
    grants = [call for call in oauth.of("/token") if call["body"]["grant_type"].endswith("jwt-bearer")]
    assert grants, "google-auth signed a JWT assertion and the server verified it with the key's public half"
    token = c.credentials_now().token
    assert oauth.tokens[token][0] == SA_EMAIL
    for secret in (sa_key["private_key"], sa_key["private_key_id"], os.environ[sa_key["ref"][4:]], token):
        assert redact.redact(secret) == "***"


def test_gcp_tokens_are_cached_and_refreshed_before_they_expire(oauth, sa_key):
    c = gcp_sa(sa_key, oauth)
    count = lambda: len(oauth.of("/token"))  # noqa: E731
    start = count()
    first = c.credentials_now().token
    assert c.credentials_now().token == first and count() == start + 1  # cached: one refresh
    oauth.expires_in = 120  # less than REFRESH_MARGIN_S: each use refreshes
    try:
        CREDENTIALS.clear()
        short = c.credentials_now().token
        again = c.credentials_now().token
    finally:
        oauth.expires_in = 3600
    assert short != again and count() == start + 3


def test_gcp_a_refused_key_is_a_clear_error_without_the_secret(oauth, monkeypatch):
    key = service_account_key(oauth, email=f"deleted@{PROJECT}.iam.gserviceaccount.com")
    del oauth.sa_keys[key["client_email"]]  # the key was deleted
    monkeypatch.setenv("GONE_SA_JSON", json.dumps(key))
    with pytest.raises(ConnectorError) as err:
        conn("gcp", "service-account", name="gone", service_account_json="env:GONE_SA_JSON").identity()
    text = str(err.value)
    assert "connector 'gone' (gcp/service-account)" in text and "refreshing the access token failed" in text
    assert "invalid_grant" in text and "create a new key" in text
    assert key["private_key_id"] not in text and "PRIVATE KEY" not in text


def test_gcp_credentials_set_takes_the_prefect_block_fields(oauth, monkeypatch):
    """A credential set (here env: JSON; airflow:/prefect: give the same fields) with service_account_info and project."""
    key = service_account_key(oauth)
    monkeypatch.setenv("GCP_BLOCK", json.dumps({"service_account_info": key, "project": "from-block"}))
    c = conn("gcp", "service-account", credentials="env:GCP_BLOCK")
    assert c.identity().startswith(f"{SA_EMAIL} (project from-block)")
    assert redact.redact(key["private_key"]) == "***"


def test_gcp_a_non_service_account_key_says_which_method_fits(oauth, monkeypatch):
    monkeypatch.setenv("USER_AS_SA", json.dumps({"type": "authorized_user", "client_id": "c", "client_secret": marker("cs"), "refresh_token": marker("rt")}))
    with pytest.raises(refs.SecretReferenceError) as err:
        conn("gcp", "service-account", service_account_json="env:USER_AS_SA").identity()
    assert "not a service-account key" in str(err.value) and "connectors.team.service_account_json" in str(err.value)


@pytest.fixture
def user_file(oauth, tmp_path):
    refresh, secret = marker("refresh"), marker("client-secret")
    oauth.refresh_tokens[refresh] = "dev@example.com"
    path = tmp_path / "adc.json"
    path.write_text(json.dumps({"type": "authorized_user", "client_id": "client.apps.googleusercontent.com", "client_secret": secret,
                                "refresh_token": refresh, "quota_project_id": PROJECT, "token_uri": f"{oauth.url}/token"}))
    return path, refresh, secret


def test_gcp_user_account_refreshes_with_its_refresh_token(oauth, user_file):
    path, refresh, secret = user_file
    c = conn("gcp", "user-account", user_account_json=f"file:{path}", tokeninfo_endpoint=f"{oauth.url}/tokeninfo")
    said = c.identity()
    assert said.startswith(f"dev@example.com (user account) (project {PROJECT}); token valid until")
    assert oauth.of("/token")[-1]["body"]["refresh_token"] == refresh
    assert redact.redact(refresh) == "***" and redact.redact(secret) == "***"
    assert redact.redact(c.credentials_now().token) == "***"


def test_gcp_revoked_refresh_token_says_to_log_in_again(oauth, tmp_path):
    path = tmp_path / "revoked.json"
    path.write_text(json.dumps({"type": "authorized_user", "client_id": "c", "client_secret": marker("cs"), "refresh_token": marker("revoked"), "token_uri": f"{oauth.url}/token"}))
    with pytest.raises(ConnectorError) as err:
        conn("gcp", "user-account", user_account_json=f"file:{path}").identity()
    assert "gcloud auth application-default login" in str(err.value)


def test_gcp_oauth2_token_is_checked_and_cannot_be_refreshed(oauth, monkeypatch, private):
    token, _ = oauth.issue("ci@example.com")
    monkeypatch.setenv("GCP_BARE_TOKEN", token)
    c = conn("gcp", "oauth2-token", token="env:GCP_BARE_TOKEN", project=PROJECT, tokeninfo_endpoint=f"{oauth.url}/tokeninfo")
    said = c.identity()
    assert said.startswith(f"ci@example.com (project {PROJECT}); a bare access token valid until") and "cannot be refreshed" in said
    assert redact.redact(token) == "***"
    assert c.skypilot_env(private)["CLOUDSDK_AUTH_ACCESS_TOKEN"] == token
    assert c.registry_credentials("europe-docker.pkg.dev/p/r") == ("oauth2accesstoken", token)
    # Expired (tokeninfo now says 0 s left): refused with the fix, no refresh attempted.
    oauth.tokens[token] = ("ci@example.com", time.time())
    c.identity()
    with pytest.raises(ConnectorError) as err:
        c.registry_credentials("gcr.io")
    assert "cannot refresh" in str(err.value) and "gcloud auth print-access-token" in str(err.value)
    # Unknown to Google (revoked): tokeninfo refuses it.
    monkeypatch.setenv("GCP_BARE_TOKEN", marker("revoked-token"))
    with pytest.raises(ConnectorError) as err:
        conn("gcp", "oauth2-token", name="other", token="env:GCP_BARE_TOKEN", tokeninfo_endpoint=f"{oauth.url}/tokeninfo").identity()
    assert "HTTP 400" in str(err.value) and "cannot refresh" in str(err.value) and os.environ["GCP_BARE_TOKEN"] not in str(err.value)


def test_gcp_impersonation_mints_through_iam_credentials(oauth, sa_key, private, home_untouched, monkeypatch):
    c = conn("gcp", "impersonation", target_principal=TARGET, service_account_json=sa_key["ref"], iam_endpoint=oauth.url, lifetime_s=1800)
    assert c.identity().startswith(f"{TARGET} (impersonated) (project {PROJECT})")
    call = oauth.of(f"/v1/projects/-/serviceAccounts/{TARGET}:generateAccessToken")[-1]
    assert oauth.bearer(call) == SA_EMAIL  # the source's token
    assert call["body"]["lifetime"] == "1800s" and call["body"]["scope"] == [gcp_module.CLOUD_PLATFORM]
    assert oauth.tokens[c.credentials_now().token][0] == TARGET
    # SkyPilot's google-auth gets an impersonated_service_account file over the same source key.
    import google.auth

    env = c.skypilot_env(private)
    assert_private_files(env, private, ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE", "CLOUDSDK_CONFIG"))
    assert env["CLOUDSDK_AUTH_IMPERSONATE_SERVICE_ACCOUNT"] == TARGET
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", env["GOOGLE_APPLICATION_CREDENTIALS"])
    loaded, _ = google.auth.default()
    assert type(loaded).__module__ == "google.auth.impersonated_credentials" and loaded.service_account_email == TARGET


def test_gcp_skypilot_env_writes_key_files_only_in_the_private_folder(oauth, sa_key, user_file, private, home_untouched, monkeypatch):
    import google.auth
    from google.auth.transport.requests import Request

    env = gcp_sa(sa_key, oauth).skypilot_env(private)
    assert env["GOOGLE_CLOUD_PROJECT"] == env["CLOUDSDK_CORE_PROJECT"] == PROJECT
    assert_private_files(env, private, ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE", "CLOUDSDK_CONFIG"))
    assert stat.S_IMODE(Path(env["CLOUDSDK_CONFIG"]).stat().st_mode) == 0o700
    # What SkyPilot's google.auth.default() reads is a key that works.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", env["GOOGLE_APPLICATION_CREDENTIALS"])
    loaded, project = google.auth.default(scopes=[gcp_module.CLOUD_PLATFORM])
    loaded.refresh(Request())
    assert project == PROJECT and oauth.tokens[loaded.token][0] == SA_EMAIL

    path, _, _ = user_file
    env = conn("gcp", "user-account", user_account_json=f"file:{path}").skypilot_env(private)
    assert_private_files(env, private, ("GOOGLE_APPLICATION_CREDENTIALS",))
    assert json.loads(Path(env["GOOGLE_APPLICATION_CREDENTIALS"]).read_text())["type"] == "authorized_user"
    assert conn("gcp", "implicit").skypilot_env(private) == {}


def test_gcp_node_gets_a_token_downscoped_to_the_store_prefix(oauth, sa_key):
    c = gcp_sa(sa_key, oauth)
    access = c.node_store_access("gs://payloads/runs/r1", node="train", ttl_s=7200)
    token = access.secrets["SKYVM_GCS_TOKEN"]
    assert oauth.tokens[token][0] == f"downscoped:{SA_EMAIL}" and token != c.credentials_now().token
    exchange = oauth.of("/v1/token")[-1]["body"]
    assert exchange["subject_token"] == c.credentials_now().token
    # Google's STS takes the options quoted, then form-encoded.
    rule = json.loads(unquote(exchange["options"]))["accessBoundary"]["accessBoundaryRules"][0]
    assert rule["availableResource"] == "//storage.googleapis.com/projects/_/buckets/payloads"
    assert "objects/runs/r1/'" in rule["availabilityCondition"]["expression"] and "objectListPrefix" in rule["availabilityCondition"]["expression"]
    assert access.envs == {"SKYVM_GCS_PROJECT": PROJECT}
    assert abs(access.expires_at - (time.time() + 3600)) < 60
    assert access.scope.startswith("gs://payloads/runs/r1/* (downscoped access token until ")
    assert redact.redact(token) == "***"
    undownscoped = gcp_sa(sa_key, oauth, downscope=False).node_store_access("gs://payloads/x", node="n")
    assert "not narrowed" in undownscoped.scope


def test_gcp_registry_login_is_oauth2accesstoken(oauth, sa_key):
    c = gcp_sa(sa_key, oauth)
    user, password = c.registry_credentials("us-central1-docker.pkg.dev/proj/repo")
    assert user == "oauth2accesstoken" and oauth.tokens[password][0] == SA_EMAIL
    with pytest.raises(ConnectorError, match="Artifact Registry"):
        c.registry_credentials("docker.io")


def test_gcp_emulator_is_reached_anonymously_and_nodes_get_no_token(gcs_server, monkeypatch):
    import fsspec

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    c = conn("gcp", "implicit", project=PROJECT)
    options = c.fs_options("gs://skyvm-test/p")
    assert options["token"] == "anon" and options["endpoint_url"] == gcs_server
    started = time.time()
    fs = fsspec.filesystem("gs", **options)
    name = f"skyvm-test/connectors/{uuid.uuid4().hex}.txt"
    fs.pipe(name, b"through the emulator")
    assert fs.cat(name) == b"through the emulator"
    assert time.time() - started < 20, "gcsfs waited on the Storage Control API the emulator does not have"
    access = c.node_store_access("gs://skyvm-test/p", node="n")
    assert access.secrets == {} and access.envs == {"SKYVM_GCS_PROJECT": PROJECT, "STORAGE_EMULATOR_HOST": gcs_server}


def test_gcp_implicit_and_impersonation_from_adc(oauth, tmp_path, private, monkeypatch, home_untouched):
    """ADC through GOOGLE_APPLICATION_CREDENTIALS (a key whose token_uri is the local server); impersonation from it."""
    key = service_account_key(oauth)
    adc = tmp_path / "adc.json"
    adc.write_text(json.dumps(key))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    assert conn("gcp", "implicit").identity().startswith(f"{SA_EMAIL} (project {PROJECT}); token valid until")
    assert conn("gcp", "implicit").skypilot_env(private) == {}
    c = conn("gcp", "impersonation", target_principal=TARGET, delegates=[f"middle@{PROJECT}.iam.gserviceaccount.com"], iam_endpoint=oauth.url)
    assert c.identity().startswith(f"{TARGET} (impersonated)")
    assert oauth.of(f"/v1/projects/-/serviceAccounts/{TARGET}:generateAccessToken")[-1]["body"]["delegates"] == [f"projects/-/serviceAccounts/middle@{PROJECT}.iam.gserviceaccount.com"]
    env = c.skypilot_env(private)
    assert env["CLOUDSDK_AUTH_IMPERSONATE_SERVICE_ACCOUNT"] == f"middle@{PROJECT}.iam.gserviceaccount.com,{TARGET}"
    assert "CLOUDSDK_CONFIG" not in env  # gcloud keeps the user's own login as the source
    written = json.loads(Path(env["GOOGLE_APPLICATION_CREDENTIALS"]).read_text())
    assert written["type"] == "impersonated_service_account" and written["source_credentials"]["client_email"] == SA_EMAIL
    assert_private_files(env, private, ("GOOGLE_APPLICATION_CREDENTIALS",))


def test_gcp_implicit_without_adc_says_how_to_log_in(monkeypatch, tmp_path):
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no ADC file there
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # no metadata server either
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    with pytest.raises(ConnectorError) as err:
        conn("gcp", "implicit").identity()
    assert "gcloud auth application-default login" in str(err.value)


# -- Azure -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,fields,fragment",
    [
        ("service-principal", {}, "method service-principal needs client_secret"),
        ("service-principal", {"client_secret": "env:S"}, "needs tenant_id and client_id"),
        ("access-token", {}, "method access-token needs token"),
        ("implicit", {"client_secret": "env:S"}, "client_secret is for method service-principal"),
        ("implicit", {"account_key": "env:K"}, "account_key needs account_name"),
        ("implicit", {"account_name": "a", "account_key": "env:K", "connection_string": "env:C"}, "not both"),
        ("implicit", {"connection_string": "DefaultEndpointsProtocol=https;AccountKey=abc"}, "never the secret itself"),
        ("implicit", {"authority_host": "login.example"}, "authority_host is a URL"),
    ],
)
def test_azure_settings_errors_name_the_method_and_the_field(method, fields, fragment):
    with pytest.raises(SettingsError) as err:
        conn("azure", method, **fields)
    assert fragment in str(err.value)


@pytest.fixture
def principal(oauth_tls, monkeypatch):
    client, secret = str(uuid.uuid4()), marker("client-secret")
    oauth_tls.clients[client] = secret
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", oauth_tls.ca_bundle)  # requests (azure-core's sync transport)
    monkeypatch.setenv("SSL_CERT_FILE", oauth_tls.ca_bundle)  # OpenSSL's default (aiohttp, adlfs's async transport)
    var = "SP_SECRET_" + uuid.uuid4().hex[:8].upper()
    monkeypatch.setenv(var, secret)
    return {"tenant_id": TENANT, "client_id": client, "client_secret": f"env:{var}", "authority_host": oauth_tls.url}, secret


def test_azure_service_principal_gets_a_token_from_the_authority(oauth_tls, principal, private, home_untouched):
    fields, secret = principal
    c = conn("azure", "service-principal", subscription_id="sub-1", **fields)
    said = c.identity()
    assert said.startswith(f"service principal {fields['client_id']} in tenant {TENANT}: token for https://management.azure.com valid until")
    assert said.endswith("; subscription sub-1")
    call = [x for x in oauth_tls.calls if x["path"] == f"/{TENANT}/oauth2/v2.0/token"][-1]
    assert call["body"]["client_secret"] == secret and call["body"]["scope"] == azure_module.MANAGEMENT_SCOPE
    assert redact.redact(secret) == "***"
    env = c.skypilot_env(private)
    assert env == {"AZURE_SUBSCRIPTION_ID": "sub-1", "AZURE_TENANT_ID": TENANT, "AZURE_CLIENT_ID": fields["client_id"], "AZURE_CLIENT_SECRET": secret, "AZURE_AUTHORITY_HOST": oauth_tls.url}
    assert list(private.iterdir()) == []
    assert c.registry_credentials("team.azurecr.io") == (fields["client_id"], secret)
    with pytest.raises(ConnectorError, match="Azure Container Registry"):
        c.registry_credentials("ghcr.io/team")


def test_azure_implicit_uses_the_environment_credential_chain(oauth_tls, principal, monkeypatch):
    fields, secret = principal
    monkeypatch.setenv("AZURE_TENANT_ID", TENANT)
    monkeypatch.setenv("AZURE_CLIENT_ID", fields["client_id"])
    monkeypatch.setenv("AZURE_CLIENT_SECRET", secret)
    c = conn("azure", "implicit", authority_host=oauth_tls.url)
    assert c.identity().startswith(f"service principal {fields['client_id']} in tenant {TENANT}: token for https://management.azure.com")
    assert c.skypilot_env(Path("/nonexistent")) == {}  # nothing to give: SkyPilot's own az login is used


def test_azure_a_wrong_client_secret_is_a_clear_error(oauth_tls, principal, monkeypatch):
    fields, _ = principal
    wrong = marker("wrong-secret")
    monkeypatch.setenv(fields["client_secret"][4:], wrong)
    with pytest.raises(ConnectorError) as err:
        conn("azure", "service-principal", name="sp", **fields).identity()
    text = str(err.value)
    assert "connector 'sp' (azure/service-principal)" in text and "AADSTS7000215" in text and "check tenant_id, client_id" in text
    assert wrong not in text


def test_azure_access_token_expiry_is_known_and_refused(monkeypatch):
    good = fake_jwt({"aud": "https://storage.azure.com", "tid": TENANT, "upn": "dev@example.com", "exp": int(time.time()) + 600})
    monkeypatch.setenv("AZ_TOKEN", good)
    said = conn("azure", "access-token", token="env:AZ_TOKEN").identity()
    assert said.startswith(f"user dev@example.com in tenant {TENANT}: token for https://storage.azure.com valid until") and "cannot be refreshed" in said
    assert redact.redact(good) == "***"
    monkeypatch.setenv("AZ_OLD_TOKEN", fake_jwt({"tid": TENANT, "appid": "app", "exp": int(time.time()) - 60}))
    with pytest.raises(ConnectorError) as err:
        conn("azure", "access-token", token="env:AZ_OLD_TOKEN").identity()
    assert "expired at" in str(err.value) and "cannot refresh" in str(err.value)


def test_azure_acr_token_exchange(oauth, monkeypatch):
    aad = fake_jwt({"tid": TENANT, "exp": int(time.time()) + 600})
    oauth.tokens[aad] = ("dev", time.time() + 600)
    refresh = azure_module.acr_refresh_token(oauth.url, "team.azurecr.io", aad, TENANT, "azure (access-token)")
    call = oauth.of("/oauth2/exchange")[-1]["body"]
    assert call == {"grant_type": "access_token", "service": "team.azurecr.io", "access_token": aad, "tenant": TENANT}
    assert redact.redact(refresh) == "***"
    with pytest.raises(ConnectorError, match="AcrPull"):
        azure_module.acr_refresh_token(oauth.url, "team.azurecr.io", "not-a-token", TENANT, "azure (access-token)")


@pytest.fixture
def storage_key(azurite, monkeypatch):
    var = "AZ_KEY_" + uuid.uuid4().hex[:8].upper()
    monkeypatch.setenv(var, azurite.account_key)
    return {"account_name": azurite.account_name, "account_key": f"env:{var}", "blob_endpoint": azurite.blob_endpoint}


def test_azure_storage_key_identity_lists_containers(azurite, storage_key):
    said = conn("azure", "implicit", **storage_key).identity()
    assert said.startswith(f"storage account {azurite.account_name} at {azurite.blob_endpoint}: ") and "skyvm-test" in said
    assert redact.redact(azurite.account_key) == "***"


@pytest.mark.parametrize("given", ["account_key", "connection_string", "environment"])
def test_azure_node_gets_a_container_sas_never_the_key(azurite, storage_key, monkeypatch, given):
    from azure.core.exceptions import HttpResponseError
    from azure.storage.blob import BlobServiceClient

    if given == "account_key":
        c = conn("azure", "implicit", **storage_key)
    elif given == "connection_string":
        monkeypatch.setenv("AZ_CONN", azurite.connection_string)
        c = conn("azure", "implicit", connection_string="env:AZ_CONN")
    else:
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
        c = conn("azure", "implicit")
    admin = BlobServiceClient.from_connection_string(azurite.connection_string)
    other = "other-" + uuid.uuid4().hex[:8]
    admin.create_container(other)
    admin.get_blob_client(other, "secret.txt").upload_blob(b"not for the node")

    access = c.node_store_access("az://skyvm-test/runs/r1", node="train", ttl_s=900)
    secret = access.secrets["AZURE_STORAGE_CONNECTION_STRING"]
    assert secret.startswith(f"BlobEndpoint={azurite.blob_endpoint};SharedAccessSignature=")
    assert azurite.account_key not in secret and "AccountKey" not in secret and access.envs == {}
    assert abs(access.expires_at - (time.time() + 900)) < 60 and access.scope.startswith("az://skyvm-test (container SAS: read, write, delete, list until ")
    assert redact.redact(secret) == "***"

    node = BlobServiceClient.from_connection_string(secret)
    blob = node.get_blob_client("skyvm-test", f"runs/r1/{uuid.uuid4().hex}")
    blob.upload_blob(b"payload")
    assert blob.download_blob().readall() == b"payload"
    assert blob.blob_name in [b.name for b in node.get_container_client("skyvm-test").list_blobs(name_starts_with="runs/r1/")]
    blob.delete_blob()
    with pytest.raises(HttpResponseError) as denied:
        node.get_blob_client(other, "secret.txt").download_blob().readall()
    assert denied.value.status_code == 403
    admin.delete_container(other)


@pytest.fixture(scope="module")
def azurite_oauth(oauth_tls, tmp_path_factory):
    """A second Azurite, over HTTPS with OAuth on ("basic": it checks a bearer token's issuer, audience
    and lifetime, not its signature), so a principal's token reaches storage as it does on Azure."""
    import emulators
    from netutil import popen_logged, start_owned

    folder = tmp_path_factory.mktemp("azurite-oauth")
    cmd = [str(emulators.azurite_blob_exe()), "--blobHost", "127.0.0.1", "--location", str(folder / "data"),
           "--skipApiVersionCheck", "--loose", "--oauth", "basic", "--cert", oauth_tls.ca_bundle, "--key", oauth_tls.key_file]
    # Held by this Azurite itself (another test run's never answers for it); probed below over TLS.
    proc, port = start_owned(lambda port: popen_logged([*cmd, "--blobPort", str(port)], folder / "log"), None, folder / "log", what="Azurite (OAuth, HTTPS)")
    server = emulators.Server(proc, f"https://127.0.0.1:{port}", folder / "log")
    try:
        from azure.storage.blob import BlobServiceClient

        endpoint = f"{server.endpoint}/{emulators.AZURITE_ACCOUNT}"
        admin = BlobServiceClient(endpoint, credential={"account_name": emulators.AZURITE_ACCOUNT, "account_key": emulators.AZURITE_KEY},
                                  connection_verify=oauth_tls.ca_bundle, retry_total=0)
        deadline = time.time() + 30
        while True:
            try:
                admin.create_container("skyvm-test")
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"Azurite (OAuth, HTTPS) did not come up: {(folder / 'log').read_text()[-2000:]}") from None
                time.sleep(0.3)
        server.blob_endpoint = endpoint
        yield server
    finally:
        server.stop()


def test_azure_principal_reaches_storage_with_its_token_and_nodes_get_a_user_delegation_sas(oauth_tls, azurite_oauth, principal):
    import fsspec

    fields, secret = principal
    c = conn("azure", "service-principal", account_name="devstoreaccount1", blob_endpoint=azurite_oauth.blob_endpoint, **fields)
    said = c.identity()
    assert said.startswith(f"service principal {fields['client_id']} in tenant {TENANT}") and "storage account devstoreaccount1" in said and "skyvm-test" in said
    assert any(x["body"].get("scope") == "https://storage.azure.com/.default" for x in oauth_tls.calls if x["method"] == "POST")

    access = c.node_store_access("az://skyvm-test/runs/r1", node="train", ttl_s=600)
    connection = access.secrets["AZURE_STORAGE_CONNECTION_STRING"]
    sas = parse_qs(connection.split("SharedAccessSignature=", 1)[1])
    assert sas["skoid"] == [fields["client_id"]] and sas["sktid"] == [TENANT] and sas["sr"] == ["c"] and sas["sp"] == ["racwdl"]
    assert "AccountKey" not in connection and secret not in connection and "user delegation SAS" in access.scope
    assert redact.redact(connection) == "***"
    # Not used against Azurite: azure-storage-blob 12.31 signs a user delegation SAS in service version
    # 2026-10-06's form, which Azurite 3.35 (2025-11-05) computes differently and refuses.

    # The launcher's own file system: adlfs with the principal's (async) credential and the same authority.
    # aiohttp trusts a default context made at import; the test's CA joins it (what SSL_CERT_FILE does for a new process).
    import aiohttp.connector

    aiohttp.connector._SSL_CONTEXT_VERIFIED.load_verify_locations(cafile=oauth_tls.ca_bundle)
    fs = fsspec.filesystem("az", **c.fs_options("az://skyvm-test/x"))
    name = f"skyvm-test/connectors/{uuid.uuid4().hex}.txt"
    fs.pipe(name, b"with a bearer token")
    assert fs.cat(name) == b"with a bearer token"


def test_azure_fs_options_open_the_container_with_adlfs(azurite, storage_key):
    import fsspec

    options = conn("azure", "implicit", **storage_key).fs_options("az://skyvm-test/x")
    assert set(options) == {"connection_string"}
    fs = fsspec.filesystem("az", **options)
    name = f"skyvm-test/connectors/{uuid.uuid4().hex}.txt"
    fs.pipe(name, b"through adlfs")
    assert fs.cat(name) == b"through adlfs"
    fs.rm(name)


# -- Lambda ----------------------------------------------------------------------


def test_lambda_settings_errors():
    with pytest.raises(SettingsError, match="method api-key needs api_key"):
        conn("lambda", "api-key")
    with pytest.raises(SettingsError, match="never the secret itself"):
        conn("lambda", "api-key", api_key="secret_abc123")
    with pytest.raises(SettingsError, match="api_key is for method api-key"):
        conn("lambda", "implicit", api_key="env:K")


def test_lambda_api_key_is_checked_against_the_api(oauth, monkeypatch):
    key = marker("lambda-key")
    oauth.lambda_key = key
    monkeypatch.setenv("LAMBDA_KEY", key)
    c = conn("lambda", "api-key", api_key="env:LAMBDA_KEY", api_base=f"{oauth.url}/api/v1")
    assert c.identity() == f"Lambda Cloud API key accepted at {oauth.url}/api/v1 (2 instance types offered)"
    assert redact.redact(key) == "***"
    monkeypatch.setenv("LAMBDA_KEY", marker("wrong-key"))
    with pytest.raises(ConnectorError) as err:
        c.identity()
    assert "HTTP 401" in str(err.value) and "create a new one" in str(err.value) and os.environ["LAMBDA_KEY"] not in str(err.value)
    monkeypatch.setenv("LAMBDA_KEY", "")
    with pytest.raises(ConnectorError, match="empty value"):
        c.identity()


def test_lambda_skypilot_gets_a_private_home_with_the_key(private, monkeypatch, home_untouched):
    key = marker("lambda-key")
    monkeypatch.setenv("LAMBDA_KEY", key)
    env = conn("lambda", "api-key", api_key="env:LAMBDA_KEY").skypilot_env(private)
    assert env == {"HOME": str(private / "home")}
    keys = private / "home" / ".lambda_cloud" / "lambda_keys"
    assert keys.read_text() == f"api_key = {key}\n" and stat.S_IMODE(keys.stat().st_mode) == 0o600
    assert stat.S_IMODE((private / "home").stat().st_mode) == 0o700
    assert conn("lambda", "implicit").skypilot_env(private) == {}


def test_lambda_private_home_links_the_rest_of_the_real_home(private, tmp_path, monkeypatch):
    real = tmp_path / "real-home"
    (real / ".sky").mkdir(parents=True)
    (real / ".ssh").mkdir()
    (real / ".lambda_cloud").mkdir()
    (real / ".lambda_cloud" / "lambda_keys").write_text("api_key = the-users-own\n")
    monkeypatch.setenv("HOME", str(real))
    monkeypatch.setenv("LAMBDA_KEY", marker("lambda-key"))
    home = Path(conn("lambda", "api-key", api_key="env:LAMBDA_KEY").skypilot_env(private)["HOME"])
    assert (home / ".sky").resolve() == real / ".sky" and (home / ".ssh").resolve() == real / ".ssh"
    assert not (home / ".lambda_cloud").is_symlink() and os.environ["LAMBDA_KEY"] in (home / ".lambda_cloud" / "lambda_keys").read_text()
    assert (real / ".lambda_cloud" / "lambda_keys").read_text() == "api_key = the-users-own\n"


def test_lambda_implicit_reads_the_file_skypilot_reads(oauth, tmp_path, monkeypatch):
    key = marker("lambda-home-key")
    oauth.lambda_key = key
    (tmp_path / ".lambda_cloud").mkdir()
    (tmp_path / ".lambda_cloud" / "lambda_keys").write_text(f"api_key = {key}\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert "accepted" in conn("lambda", "implicit", api_base=f"{oauth.url}/api/v1").identity()
    assert redact.redact(key) == "***"
    monkeypatch.setenv("HOME", str(tmp_path / "nobody"))
    with pytest.raises(ConnectorError, match="method api-key"):
        conn("lambda", "implicit").identity()


# -- Kubernetes ------------------------------------------------------------------


def kubeconfig(token: str, contexts=("dev", "prod"), current: Optional[str] = "dev") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": current,
        "clusters": [{"name": f"{c}-cluster", "cluster": {"server": f"https://{c}.k8s.example:6443", "certificate-authority": "ca.crt"}} for c in contexts],
        "users": [{"name": "ci", "user": {"token": token}}],
        "contexts": [{"name": c, "context": {"cluster": f"{c}-cluster", "user": "ci"}} for c in contexts],
    }


@pytest.fixture
def kube_file(tmp_path):
    import yaml

    token = marker("k8s-token")
    path = tmp_path / "kube" / "config"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(kubeconfig(token)))
    return path, token


def test_kubernetes_settings_errors():
    with pytest.raises(SettingsError, match="method kubeconfig needs kubeconfig"):
        conn("kubernetes", "kubeconfig")
    with pytest.raises(SettingsError, match="kubeconfig is for method kubeconfig"):
        conn("kubernetes", "implicit", kubeconfig="file:/k")


def test_kubernetes_identity_names_context_and_server(kube_file):
    path, token = kube_file
    assert conn("kubernetes", "kubeconfig", kubeconfig=f"file:{path}").identity() == "context dev at server https://dev.k8s.example:6443"
    assert conn("kubernetes", "kubeconfig", kubeconfig=f"file:{path}", context="prod").identity().startswith("context prod at server https://prod.k8s")
    assert redact.redact(token) == "***"


def test_kubernetes_wrong_or_missing_context_lists_the_contexts(kube_file, tmp_path):
    import yaml

    path, _ = kube_file
    with pytest.raises(ConnectorError) as err:
        conn("kubernetes", "kubeconfig", kubeconfig=f"file:{path}", context="staging").identity()
    assert "context 'staging' is not in kubeconfig" in str(err.value) and "its contexts: dev, prod" in str(err.value)
    bare = tmp_path / "bare"
    bare.write_text(yaml.safe_dump(kubeconfig(marker("t"), current=None)))
    with pytest.raises(ConnectorError, match="has no current-context; set context: to one of its contexts: dev, prod"):
        conn("kubernetes", "kubeconfig", kubeconfig=f"file:{bare}").identity()
    bad = tmp_path / "bad"
    bad.write_text("contexts: [unclosed")
    with pytest.raises(ConnectorError, match="is not YAML"):
        conn("kubernetes", "kubeconfig", kubeconfig=f"file:{bad}").identity()


def test_kubernetes_implicit_merges_kubeconfig_like_kubectl(tmp_path, monkeypatch):
    import yaml

    first, second = tmp_path / "a", tmp_path / "b"
    first.write_text(yaml.safe_dump(kubeconfig(marker("t1"), contexts=("dev",), current="dev")))
    second.write_text(yaml.safe_dump(kubeconfig(marker("t2"), contexts=("dev", "prod"), current="prod")))
    monkeypatch.setenv("KUBECONFIG", f"{first}{os.pathsep}{tmp_path / 'missing'}{os.pathsep}{second}")
    assert conn("kubernetes", "implicit").identity() == "context dev at server https://dev.k8s.example:6443"
    assert conn("kubernetes", "implicit", context="prod").identity() == "context prod at server https://prod.k8s.example:6443"


def test_kubernetes_skypilot_gets_a_private_kubeconfig(kube_file, private, monkeypatch, home_untouched):
    import yaml

    path, token = kube_file
    monkeypatch.setenv("KUBE_YAML", path.read_text())
    env = conn("kubernetes", "kubeconfig", kubeconfig=f"file:{path}", context="prod").skypilot_env(private)
    assert_private_files(env, private, ("KUBECONFIG",))
    written = yaml.safe_load(Path(env["KUBECONFIG"]).read_text())
    assert written["users"][0]["user"]["token"] == token
    assert written["clusters"][0]["cluster"]["certificate-authority"] == str(path.parent / "ca.crt")  # relative paths kept meaning
    env = conn("kubernetes", "kubeconfig", kubeconfig="env:KUBE_YAML").skypilot_env(private)
    assert yaml.safe_load(Path(env["KUBECONFIG"]).read_text())["current-context"] == "dev"
    assert conn("kubernetes", "implicit").skypilot_env(private) == {}
    with pytest.raises(ConnectorError, match="its contexts: dev, prod"):
        conn("kubernetes", "kubeconfig", kubeconfig=f"file:{path}", context="nope").skypilot_env(private)


# -- missing SDKs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,method,fields,module,extra",
    [
        ("gcp", "oauth2-token", {"token": "env:MISSING_SDK_TOKEN"}, "google.oauth2.credentials", "gcp"),
        ("gcp", "implicit", {}, "google.auth", "gcp"),
        ("azure", "implicit", {}, "azure.identity", "azure"),
        ("azure", "implicit", {"connection_string": "env:MISSING_SDK_TOKEN"}, "azure.storage.blob", "azure"),
        ("kubernetes", "kubeconfig", {"kubeconfig": "env:MISSING_SDK_TOKEN"}, "yaml", "kubernetes"),
    ],
)
def test_a_missing_sdk_names_the_extra_to_install(monkeypatch, kind, method, fields, module, extra):
    monkeypatch.setenv("MISSING_SDK_TOKEN", "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=" + marker("k"))
    monkeypatch.setitem(sys.modules, module, None)
    c = conn(kind, method, **fields)
    with pytest.raises(ConnectorError) as err:
        c.node_store_access("az://c/p", node="n") if module == "azure.storage.blob" else c.identity()
    assert f"pip install 'skyvm[{extra}]'" in str(err.value) and "connector 'team'" in str(err.value)


# -- the settings' shape ---------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,fingerprint",
    [
        ({"type": "aws", "method": "iam-role", "role_arn": "arn:aws:iam::1:role/r", "aws_access_key_id": "env:K", "aws_secret_access_key": "env:S", "duration_seconds": 900}, "09b5122b4bd5"),
        ({"type": "gcp", "method": "impersonation", "target_principal": "d@p.iam.gserviceaccount.com", "service_account_json": "file:/k.json", "delegates": ["a@p.iam.gserviceaccount.com"]}, "614df29429f7"),
        ({"type": "azure", "method": "service-principal", "tenant_id": "t", "client_id": "c", "client_secret": "env:S", "account_name": "acct"}, "336d5eeccca1"),
        ({"type": "lambda", "method": "api-key", "api_key": "env:LAMBDA_API_KEY"}, "f79d01e6c01a"),
        ({"type": "kubernetes", "method": "kubeconfig", "kubeconfig": "file:/kube/config", "context": "prod"}, "ab3cf577e4b1"),
    ],
)
def test_a_connector_dumps_flat_parses_back_and_keeps_its_fingerprint(fields, fingerprint):
    """Each auth method is a strategy of its own, but settings, dumps (a trigger row, a node's
    settings) and fingerprints (the SkyPilot state a credential set gets) read as one flat model:
    the same fingerprints as before the methods were split out."""
    c = conn(fields["type"], fields["method"], **{k: v for k, v in fields.items() if k not in ("type", "method")})
    dumped = c.public_dump()
    assert {k: v for k, v in dumped.items() if k in fields} == fields and dumped["name"] == "team"
    assert parse_connector("team", dumped, "connectors.team") == c
    assert c.fingerprint() == fingerprint
