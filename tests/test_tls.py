"""Mutual TLS and identity (docs/SECURITY.md), over real gRPC sockets on 127.0.0.1: a school is
the id in its certificate; a wrong CA, an expired or a revoked certificate is refused; school A's
certificate cannot act as school B; the coordinator's certificate rotates under a running
federation; plaintext beyond loopback is refused; `fedserver certs` round trip."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import shutil
import socket
import ssl
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509

from common import PROTOCOL_VERSION
from common.errors import AuthenticationError, ConfigError
from common.messages import UploadHeader
from common.pb import federation_pb2 as pb
from common.pb import federation_pb2_grpc as pb_grpc
from common.serde import command_from_pb
from common.tls import cert_info
from common.wire import grpc_options, sha256_hex, tensors_to_bytes
from fedclient.config import SchoolTLSSection
from fedclient.transfer import download, upload
from fedserver.certs import CA, init_ca
from fedserver.config import SchoolEntry, ServerTLSSection
from tests.conftest import TOKENS, coordinator_config, school_config, wait_for
from tests.test_shipped_configs import parse_unit, restore_logging  # noqa: F401  (fixture)

SCHOOLS = ("school-1", "school-2", "school-3")
QUICK = dict(school_max_examples=0, school_timeout_s=0.0)   # no local evaluation to wait for


# ---------------------------------------------------------------- helpers
@dataclasses.dataclass
class Pki:
    ca: CA
    dir: Path

    @property
    def ca_file(self) -> Path:
        return self.ca.dir / "ca.crt"

    @property
    def crl(self) -> Path:
        return self.ca.dir / "revoked.crl"

    def school(self, sid: str) -> tuple[Path, Path]:
        return self.dir / sid / f"{sid}.crt", self.dir / sid / f"{sid}.key"

    def server_tls(self, folder: Path | None = None) -> ServerTLSSection:
        folder = folder or self.dir / "server"
        return ServerTLSSection(cert=folder / "server.crt", key=folder / "server.key", client_ca=self.ca_file,
                                revocation_list=self.crl)

    def school_tls(self, sid: str) -> SchoolTLSSection:
        cert, key = self.school(sid)
        return SchoolTLSSection(ca=self.ca_file, cert=cert, key=key)

    def channel(self, address: str, sid: str | None, ca_file: Path | None = None) -> grpc.aio.Channel:
        root = (ca_file or self.ca_file).read_bytes()
        if sid is None:   # no client certificate
            return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root), options=grpc_options())
        cert, key = self.school(sid)
        creds = grpc.ssl_channel_credentials(root, key.read_bytes(), cert.read_bytes())
        return grpc.aio.secure_channel(address, creds, options=grpc_options())


def make_pki(folder: Path, schools: tuple[str, ...] = SCHOOLS) -> Pki:
    ca = init_ca(folder / "ca", name=f"CA {folder.name}", days=30)
    ca.issue_server(["127.0.0.1", "localhost"], folder / "server", days=30)
    for sid in schools:
        ca.issue_school(sid, folder / sid, days=30)
    return Pki(ca, folder)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def tls_config(tmp_path: Path, model: str, pki: Pki, *, schools: int = 2, **sections):  # type: ignore[no-untyped-def]
    cfg = coordinator_config(tmp_path, model, schools=schools, **sections)
    return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, tls=pki.server_tls()))


async def join(stub: pb_grpc.FederationStub, token: str | None = None) -> list[tuple[str, str]]:
    md = [("authorization", f"Bearer {token}")] if token else None
    resp = await stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=md, timeout=10)
    return [("x-session-token", resp.session_token)]


async def idle():  # type: ignore[no-untyped-def]
    while True:
        await asyncio.sleep(0.2)
        yield pb.ClientEvent(heartbeat=pb.Heartbeat(unix_time=0))


async def refused(coro, code: grpc.StatusCode, *texts: str) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    assert err.value.code() == code, (err.value.code(), err.value.details())
    for text in texts:
        assert text in (err.value.details() or ""), err.value.details()
    return err.value.details() or ""


def server_serial(port: int, pki: Pki, sid: str = "school-1") -> int:
    """The serial of the certificate the coordinator presents to a new connection (Python's ssl,
    speaking h2's ALPN, with a school's client certificate)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca_file)
    cert, key = pki.school(sid)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            ctx.wrap_socket(sock, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


# ---------------------------------------------------------------- 1. a federation over mutual TLS
async def test_join_session_download_upload_over_mutual_tls(tmp_path, tiny_model, pki, start_coordinator):
    """school-2 is enrolled by certificate alone (no token_sha256); it joins, holds a session,
    downloads the global adapter and uploads an update that commits the round. Plaintext and a
    TLS client without a certificate never get a call through."""
    cfg = tls_config(tmp_path, tiny_model, pki, rounds=dict(total=1, min_schools=1, quorum=1, deadline_s=60.0),
                     evaluation=dict(school_timeout_s=0.0))   # this test's school does not evaluate
    cfg = dataclasses.replace(cfg, schools=(cfg.schools[0], SchoolEntry("school-2")))
    rc = await start_coordinator(cfg)
    assert rc.coord.tls is not None
    async with pki.channel(rc.address, "school-2") as channel:
        stub = pb_grpc.FederationStub(channel)
        md = await join(stub)   # the certificate is the identity: no token
        call = stub.Session(idle(), metadata=md)
        cmd = command_from_pb(await asyncio.wait_for(call.read(), 30))
        assert cmd.round == 1
        data = await download(stub, cmd.adapter.sha256, md, bytearray())
        assert sha256_hex(data) == cmd.adapter.sha256
        delta = tensors_to_bytes({k: torch.full(v.shape, 0.01) for k, v in rc.engine.layout.items()})
        h = UploadHeader(round=1, upload_id="u-" + sha256_hex(delta)[:16], num_examples=10, digest=sha256_hex(delta),
                         total_size=len(delta), base_sha256=cmd.adapter.sha256)
        assert await upload(stub, h, delta, md) is not None
        await asyncio.wait_for(rc.run_task, 60)
        call.cancel()
    assert [(r.status, r.participants) for r in rc.store.rounds()] == [("committed", ["school-2"])]
    assert [s["id"] for s in rc.store.schools()] == ["school-2"]

    for channel in (grpc.aio.insecure_channel(rc.address, options=grpc_options()), pki.channel(rc.address, None)):
        async with channel:
            await refused(join(pb_grpc.FederationStub(channel), TOKENS["school-1"]), grpc.StatusCode.UNAVAILABLE)


async def test_a_federation_of_school_daemons_over_mutual_tls(tmp_path, tiny_model, fed_data, pki, start_coordinator,
                                                              start_school):
    """Two real daemons, their certificates from files named in school.toml, tokens as a second factor."""
    cfg = tls_config(tmp_path, tiny_model, pki, rounds=dict(total=1, min_schools=2, quorum=2, deadline_s=60.0),
                     evaluation=QUICK)
    rc = await start_coordinator(cfg)
    for sid in ("school-1", "school-2"):
        scfg = school_config(tmp_path, rc.address, sid, fed_data, tiny_model)
        await start_school(dataclasses.replace(scfg, school=dataclasses.replace(scfg.school, tls=pki.school_tls(sid))))
    await asyncio.wait_for(rc.run_task, 120)
    assert [r.status for r in rc.store.rounds()] == ["committed"]
    assert rc.store.rounds()[0].metrics["updates"] == 2


# ---------------------------------------------------------------- 2. certificates that are refused
async def test_a_certificate_from_another_ca_is_refused(tmp_path, tiny_model, pki, start_coordinator):
    rc = await start_coordinator(tls_config(tmp_path, tiny_model, pki), run_rounds=False)
    other = make_pki(tmp_path / "other", ("school-1",))
    # The school's certificate is not from the coordinator's client CA: the handshake fails.
    async with other.channel(rc.address, "school-1", ca_file=pki.ca_file) as channel:
        await refused(join(pb_grpc.FederationStub(channel), TOKENS["school-1"]), grpc.StatusCode.UNAVAILABLE)
    # The school trusts another CA than the one that issued the coordinator's certificate: it refuses to talk.
    async with pki.channel(rc.address, "school-1", ca_file=other.ca_file) as channel:
        await refused(join(pb_grpc.FederationStub(channel), TOKENS["school-1"]), grpc.StatusCode.UNAVAILABLE)
    assert rc.store.schools() == []
    async with pki.channel(rc.address, "school-1") as channel:   # the right one still works
        await join(pb_grpc.FederationStub(channel), TOKENS["school-1"])


async def test_an_expired_certificate_is_refused(tmp_path, tiny_model, pki, start_coordinator, restore_logging, capsys):
    rc = await start_coordinator(tls_config(tmp_path, tiny_model, pki), run_rounds=False)
    expired = tmp_path / "expired"
    pki.ca.issue_school("school-1", expired, days=1, start=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10))
    async with grpc.aio.secure_channel(rc.address, grpc.ssl_channel_credentials(
            pki.ca_file.read_bytes(), (expired / "school-1.key").read_bytes(), (expired / "school-1.crt").read_bytes()),
            options=grpc_options()) as channel:
        await refused(join(pb_grpc.FederationStub(channel), TOKENS["school-1"]), grpc.StatusCode.UNAVAILABLE)
    assert rc.store.schools() == []
    # A certificate that expires while its connection lasts is refused at its next call.
    info = cert_info(x509.load_pem_x509_certificate((expired / "school-1.crt").read_bytes()))
    with pytest.raises(AuthenticationError, match="expired on .* ask the federation operator for a new one"):
        rc.coord.tls.check(info)
    # The school's check-config says so before it ever dials (exit 78).
    from fedclient.cli import main

    q = json.dumps
    toml = tmp_path / "school.toml"
    toml.write_text(f"""[school]\ncoordinator = "{rc.address}"\nstate_dir = {q(str(tmp_path / "s"))}\n
[school.tls]\nca = {q(str(pki.ca_file))}\ncert = {q(str(expired / "school-1.crt"))}\nkey = {q(str(expired / "school-1.key"))}\n""")
    assert main(["check-config", "--config", str(toml)]) == 78
    err = capsys.readouterr().err
    assert "school.tls.cert: the certificate (CN=school-1" in err and "expired on" in err, err
    assert "fedserver certs issue-school --school school-1" in err


async def test_a_revoked_certificate_is_refused_on_its_next_call(tmp_path, tiny_model, pki, start_coordinator):
    """Revoked while connected: the next RPC is PERMISSION_DENIED with what to do, the open
    Session stream is ended with the reason, a new Join is refused; other schools go on."""
    rc = await start_coordinator(tls_config(tmp_path, tiny_model, pki), run_rounds=False)
    guard = rc.coord.tls
    async with pki.channel(rc.address, "school-1") as ch1, pki.channel(rc.address, "school-2") as ch2:
        s1, s2 = pb_grpc.FederationStub(ch1), pb_grpc.FederationStub(ch2)
        md1, md2 = await join(s1, TOKENS["school-1"]), await join(s2, TOKENS["school-2"])
        session = s1.Session(idle(), metadata=md1)
        await wait_for(lambda: "school-1" in rc.engine.sessions, 10, "school-1's session")
        sha = rc.engine.store.get_meta("global_sha256")
        assert await download(s1, sha, md1, bytearray())
        loads = guard.revocations.loads
        for _ in range(20):   # unchanged file: a stat per call, no re-read
            await download(s1, sha, md1, bytearray())
        assert guard.revocations.loads == loads

        revoked = pki.ca.revoke(school="school-1", reason="key_compromise")   # rewrites the configured revoked.crl
        assert [e["school"] for e in revoked] == ["school-1"]
        details = await refused(download(s1, sha, md1, bytearray()), grpc.StatusCode.PERMISSION_DENIED,
                                "school school-1", "has been revoked", "ask them for a new one")
        assert revoked[0]["serial"] in details
        # its open stream is ended with the reason (the daemon reconnects, and its Join is refused)
        ended = command_from_pb(await asyncio.wait_for(session.read(), 10))
        assert "revoked" in ended.reason and not ended.final
        await refused(join(s1, TOKENS["school-1"]), grpc.StatusCode.PERMISSION_DENIED, "revoked")
        assert await download(s2, sha, md2, bytearray())   # school-2 is not affected
        session.cancel()


async def test_a_revoked_school_daemon_exits_78(tmp_path, tiny_model, fed_data, pki, start_coordinator, start_school):
    rc = await start_coordinator(tls_config(tmp_path, tiny_model, pki), run_rounds=False)
    scfg = school_config(tmp_path, rc.address, "school-1", fed_data, tiny_model)
    daemon, _, task = await start_school(dataclasses.replace(scfg, school=dataclasses.replace(scfg.school,
                                                                                         tls=pki.school_tls("school-1"))))
    await wait_for(lambda: "school-1" in rc.engine.sessions, 30, "school-1 to attach")
    pki.ca.revoke(school="school-1")
    assert await asyncio.wait_for(task, 30) == 78   # EX_CONFIG: systemd does not restart it


async def test_school_a_cannot_act_as_school_b(tmp_path, tiny_model, pki, start_coordinator):
    rc = await start_coordinator(tls_config(tmp_path, tiny_model, pki, schools=2), run_rounds=False)
    async with pki.channel(rc.address, "school-1") as ch1, pki.channel(rc.address, "school-2") as ch2, \
            pki.channel(rc.address, "school-3") as ch3:
        s1, s2, s3 = (pb_grpc.FederationStub(c) for c in (ch1, ch2, ch3))
        # school-1's certificate with school-2's token
        await refused(join(s1, TOKENS["school-2"]), grpc.StatusCode.PERMISSION_DENIED,
                      "certificate is school 'school-1''s", "cannot act for another school")
        # school-1's entry has a token: it is a second factor, not optional
        await refused(join(s1), grpc.StatusCode.UNAUTHENTICATED, "must also present its enrolment token")
        await refused(join(s1, "not-a-token"), grpc.StatusCode.UNAUTHENTICATED, "unknown school")
        # school-2's session token over school-1's connection
        md2 = await join(s2, TOKENS["school-2"])
        sha = rc.engine.store.get_meta("global_sha256")
        await refused(download(s1, sha, md2, bytearray()), grpc.StatusCode.PERMISSION_DENIED,
                      "belongs to school 'school-2'", "connection's certificate is school 'school-1''s")
        assert await download(s2, sha, md2, bytearray())
        # a valid certificate of a school that is not enrolled
        await refused(join(s3, TOKENS["school-3"]), grpc.StatusCode.PERMISSION_DENIED, "'school-3'", "not enrolled")
    # a certificate from the CA that names no school
    pki.ca.issue("school", "nobody", [x509.DNSName("nobody.example")], tmp_path / "nobody", "nobody")
    async with grpc.aio.secure_channel(rc.address, grpc.ssl_channel_credentials(
            pki.ca_file.read_bytes(), (tmp_path / "nobody" / "nobody.key").read_bytes(),
            (tmp_path / "nobody" / "nobody.crt").read_bytes()), options=grpc_options()) as channel:
        await refused(join(pb_grpc.FederationStub(channel)), grpc.StatusCode.PERMISSION_DENIED, "names no school")
    assert [s["id"] for s in rc.store.schools()] == ["school-2"]


# ---------------------------------------------------------------- 3. rotation
def test_half_rotated_files_keep_the_current_certificate(tmp_path, pki):
    from fedserver.tls import ServerIdentity

    live = tmp_path / "live"
    shutil.copytree(pki.dir / "server", live)
    identity = ServerIdentity(pki.server_tls(live))
    assert identity.fetch() is None   # nothing changed
    pki.ca.issue_server(["127.0.0.1", "localhost"], tmp_path / "new", days=30)
    shutil.copy(tmp_path / "new" / "server.crt", live / "server.crt.tmp")
    os.replace(live / "server.crt.tmp", live / "server.crt")   # the certificate, not yet its key
    assert identity.fetch() is None and identity.reloads == 0
    os.replace(shutil.copy(tmp_path / "new" / "server.key", live / "server.key.tmp"), live / "server.key")
    assert identity.fetch() is not None and identity.reloads == 1
    assert identity.identity.cert.serial == cert_info(x509.load_pem_x509_certificate(
        (tmp_path / "new" / "server.crt").read_bytes())).serial


async def test_server_certificate_rotation_keeps_the_federation_going(tmp_path, tiny_model, fed_data, pki,
                                                                     start_coordinator, start_school):
    """The coordinator's certificate and key are replaced mid-run: new connections get the new
    certificate, the schools' existing sessions go on and the next round commits, no restart."""
    live = tmp_path / "live"
    shutil.copytree(pki.dir / "server", live)
    cfg = coordinator_config(tmp_path, tiny_model, schools=2, rounds=dict(total=2, min_schools=2, quorum=2, deadline_s=60.0),
                             evaluation=QUICK)
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, tls=pki.server_tls(live)))
    rc = await start_coordinator(cfg)
    port = rc.coord.port
    old = await asyncio.to_thread(server_serial, port, pki)
    for sid in ("school-1", "school-2"):
        scfg = school_config(tmp_path, rc.address, sid, fed_data, tiny_model)
        await start_school(dataclasses.replace(scfg, school=dataclasses.replace(scfg.school, tls=pki.school_tls(sid))))
    await wait_for(lambda: len(rc.engine.sessions) == 2 and rc.engine.current is not None, 60, "round 1 to open")
    sessions = dict(rc.engine.sessions)

    _, _, new_cert = pki.ca.issue_server(["127.0.0.1", "localhost"], tmp_path / "renewed", days=60)
    for name in ("server.key", "server.crt"):   # each replaced atomically, as `install` does
        shutil.copy(tmp_path / "renewed" / name, live / f".{name}.tmp")
        os.replace(live / f".{name}.tmp", live / name)
    assert await asyncio.to_thread(server_serial, port, pki) == new_cert.serial_number != old
    assert rc.coord.tls.identity.reloads == 1
    async with pki.channel(rc.address, "school-1") as channel:   # a new gRPC connection verifies it: the call gets through
        await refused(pb_grpc.FederationStub(channel).UploadStatus(pb.UploadStatusRequest(upload_id="x"),
                                                                  metadata=[("x-session-token", "nope")]),
                      grpc.StatusCode.UNAUTHENTICATED, "no valid session")
    await asyncio.wait_for(rc.run_task, 120)
    assert [r.status for r in rc.store.rounds()] == ["committed", "committed"]
    assert all(rc.engine.sessions.get(sid) is sess for sid, sess in sessions.items())   # never reconnected


# ---------------------------------------------------------------- 4. plaintext, explicitly and on loopback only
def _coordinator_toml(tmp: Path, listen: str, tls: str) -> Path:
    from fedserver.auth import hash_token

    path = tmp / "coordinator.toml"
    path.write_text(f"""[server]
listen = "{listen}"
state_dir = {json.dumps(str(tmp / "state"))}
{tls}
[rounds]
min_schools = 1
quorum = 1
[[schools]]
id = "school-1"
token_sha256 = "{hash_token(TOKENS['school-1'])}"
""")
    return path


async def test_plaintext_beyond_loopback_is_refused_without_the_explicit_flag(tmp_path, tiny_model, restore_logging, capsys,
                                                                             monkeypatch):
    from common.config import load_toml
    from fedserver.app import create_server
    from fedserver.cli import main
    from fedserver.config import CoordinatorConfig

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    cfg = _coordinator_toml(tmp_path, "0.0.0.0:50051", "[server.tls]\ninsecure = true\n")
    for command in ("check-config", "serve"):
        assert main([command, "--config", str(cfg)]) == 78
        err = capsys.readouterr().err
        assert "server.tls.insecure: listen = '0.0.0.0:50051' is reachable beyond this machine" in err, err
        assert "[server.tls] cert, key and client_ca" in err and "insecure_beyond_loopback = true" in err
    assert not (tmp_path / "state").exists()
    # insisted on: it loads (not bound here: tests bind 127.0.0.1 only)
    cfg.write_text(cfg.read_text().replace("insecure = true", "insecure = true\ninsecure_beyond_loopback = true"))
    assert load_toml(CoordinatorConfig, cfg).server.tls.insecure_beyond_loopback
    # a config built in code is refused by create_server as well, before it binds anything
    code_cfg = coordinator_config(tmp_path, tiny_model, tls=False)
    code_cfg = dataclasses.replace(code_cfg, server=dataclasses.replace(code_cfg.server, listen="0.0.0.0:0"))
    with pytest.raises(ConfigError, match="insecure_beyond_loopback"):
        await create_server(code_cfg)
    # no [server.tls] at all: TLS, and without files or credentials that is a clear exit 78
    cfg = _coordinator_toml(tmp_path, "127.0.0.1:0", "")
    assert main(["check-config", "--config", str(cfg)]) == 78
    err = capsys.readouterr().err
    assert "server.tls.cert: not set, and $CREDENTIALS_DIRECTORY is not set" in err and "docs/SECURITY.md" in err
    # the school side: plaintext to a coordinator elsewhere is refused the same way
    from fedclient.config import SchoolConfig

    school = tmp_path / "school.toml"
    school.write_text('[school]\ncoordinator = "10.1.2.3:50051"\ntoken_file = "t"\n[school.tls]\ninsecure = true\n')
    with pytest.raises(ConfigError, match="school.tls.insecure: the coordinator 10.1.2.3:50051 is not on this machine"):
        load_toml(SchoolConfig, school)


# ---------------------------------------------------------------- 5. systemd credentials and check-config
async def test_keys_from_systemd_credentials(tmp_path, tiny_model, fed_data, pki, start_coordinator, start_school,
                                             monkeypatch):
    """cert/key/CA unset: read from $CREDENTIALS_DIRECTORY under the names the units' LoadCredential= give."""
    from common.tls import SCHOOL_CREDENTIALS, SERVER_CREDENTIALS
    from tests.test_shipped_configs import UNITS

    creds = tmp_path / "credentials"
    creds.mkdir()
    cert, key = pki.school("school-1")
    for name, source in {"server.crt": pki.dir / "server" / "server.crt", "server.key": pki.dir / "server" / "server.key",
                         "ca.crt": pki.ca_file, "school.crt": cert, "school.key": key}.items():
        shutil.copy(source, creds / name)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = coordinator_config(tmp_path, tiny_model, schools=1, rounds=dict(total=1, min_schools=1, quorum=1, deadline_s=60.0),
                             evaluation=QUICK)
    cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, tls=ServerTLSSection(revocation_list=pki.crl)))
    rc = await start_coordinator(cfg)
    scfg = school_config(tmp_path, rc.address, "school-1", fed_data, tiny_model)
    await start_school(dataclasses.replace(scfg, school=dataclasses.replace(scfg.school, tls=SchoolTLSSection())))
    await asyncio.wait_for(rc.run_task, 120)
    assert [r.status for r in rc.store.rounds()] == ["committed"]
    # "" in a config file means unset too (not the config's folder)
    from common.config import load_toml
    from fedserver.config import CoordinatorConfig

    toml = _coordinator_toml(tmp_path, "127.0.0.1:0", '[server.tls]\ncert = ""\nkey = ""\nclient_ca = ""\n')
    assert load_toml(CoordinatorConfig, toml).server.tls == ServerTLSSection()
    # the units hand over exactly these names
    for unit, names in (("fedserver", SERVER_CREDENTIALS), ("fedclient", SCHOOL_CREDENTIALS)):
        loaded = {v.split(":", 1)[0] for v in parse_unit(UNITS / f"{unit}.service")["Service"].get("LoadCredential", [])}
        assert loaded == set(names.values()), (unit, loaded)


def test_check_config_names_the_tls_key_to_fix(tmp_path, pki, restore_logging, capsys):
    from fedserver.cli import main

    def check(tls: str) -> str:
        assert main(["check-config", "--config", str(_coordinator_toml(tmp_path, "127.0.0.1:0", tls))]) == 78
        return capsys.readouterr().err

    q = json.dumps
    server = pki.dir / "server"
    good = {"cert": server / "server.crt", "key": server / "server.key", "client_ca": pki.ca_file, "revocation_list": pki.crl}

    def table(**over: Path) -> str:
        return "[server.tls]\n" + "".join(f"{k} = {q(str(v))}\n" for k, v in {**good, **over}.items())

    assert f"server.tls.cert: {tmp_path / 'missing.crt'} does not exist" in check(table(cert=tmp_path / "missing.crt"))
    assert "server.tls.key: this private key does not belong to the certificate" in check(
        table(key=pki.dir / "school-1" / "school-1.key"))
    assert "server.tls.cert: not a PEM certificate file" in check(table(cert=pki.crl))
    other = make_pki(tmp_path / "other", ())
    assert "server.tls.revocation_list: " in (err := check(table(revocation_list=other.crl))) and \
        "not signed by the client CA" in err
    assert "server.tls.client_ca: holds no CA certificate" in check(table(client_ca=server / "server.crt"))
    assert main(["check-config", "--config", str(_coordinator_toml(tmp_path, "127.0.0.1:0", table()))]) == 0


# ---------------------------------------------------------------- 6. fedserver certs
def test_certs_cli_round_trip(tmp_path, restore_logging, capsys):
    from fedserver.cli import main

    ca = tmp_path / "ca"
    assert main(["certs", "init-ca", "--dir", str(ca)]) == 0
    assert (ca / "ca.key").stat().st_mode & 0o777 == 0o600 and (ca / "revoked.crl").exists()
    assert main(["certs", "init-ca", "--dir", str(ca)]) == 78
    assert "already holds a CA" in capsys.readouterr().err
    assert main(["certs", "issue-school", "--dir", str(ca), "--school", "school-a", "--out", str(tmp_path / "a")]) == 0
    assert main(["certs", "issue-server", "--dir", str(ca), "--host", "coord.example.org", "--host", "10.0.0.5",
                 "--out", str(tmp_path / "srv")]) == 0
    capsys.readouterr()
    for key in (tmp_path / "a" / "school-a.key", tmp_path / "srv" / "server.key"):
        assert key.stat().st_mode & 0o777 == 0o600
    info = cert_info(x509.load_pem_x509_certificate((tmp_path / "a" / "school-a.crt").read_bytes()))
    assert info.school_id == "school-a" and info.client_auth and not info.server_auth and not info.is_ca
    srv = cert_info(x509.load_pem_x509_certificate((tmp_path / "srv" / "server.crt").read_bytes()))
    assert srv.dns_names == ("coord.example.org",) and srv.ip_addresses == ("10.0.0.5",) and srv.server_auth
    # an existing file or a symlink is never overwritten or followed
    assert main(["certs", "issue-school", "--dir", str(ca), "--school", "school-a", "--out", str(tmp_path / "a")]) == 78
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "school-b.key").symlink_to(tmp_path / "victim")
    assert main(["certs", "issue-school", "--dir", str(ca), "--school", "school-b", "--out", str(tmp_path / "b")]) == 78
    assert not (tmp_path / "victim").exists()
    assert main(["certs", "issue-school", "--dir", str(ca), "--school", "bad/id"]) == 78
    assert "use letters, digits" in capsys.readouterr().err
    assert main(["certs", "list", "--dir", str(tmp_path / "nope")]) == 78
    assert "init-ca" in capsys.readouterr().err

    assert main(["certs", "list", "--dir", str(ca), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["kind"], e["school"], e["status"]) for e in listed] == [("school", "school-a", "valid"), ("server", None, "valid")]
    assert main(["certs", "revoke", "--dir", str(ca), "--school", "school-a"]) == 0
    assert f"revoked {info.serial_hex}" in capsys.readouterr().out
    assert main(["certs", "revoke", "--dir", str(ca), "--serial", "0xdeadbeef"]) == 78
    assert "no certificate with serial deadbeef" in capsys.readouterr().err
    assert main(["certs", "list", "--dir", str(ca)]) == 0
    out = capsys.readouterr().out
    assert "school-a" in out and "revoked" in out and "coord.example.org,10.0.0.5" in out
    crl = x509.load_pem_x509_crl((ca / "revoked.crl").read_bytes())
    assert [r.serial_number for r in crl] == [info.serial]
    assert crl.is_signature_valid(x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes()).public_key())
