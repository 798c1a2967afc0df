"""Shared fixtures: a tiny model with the real SmolLM2 tokenizer, small real data, and
factories for real coordinators (port 0 on 127.0.0.1) and school daemons. Coordinators and
schools speak mutual TLS by default, with certificates from one throwaway federation CA per
test session (`pki()`); `tls=False` gives plaintext, for the tests that need to see or forge the
bytes on the wire."""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from common.data import SCHOOL_HELDOUT, prepare_federation_data
from common.models import build_tiny_model
from fedserver.auth import hash_token
from fedserver.config import (
    CoordinatorConfig, EvaluationSection, LoraSection, ModelSection, RoundsSection, SchoolEntry,
    ServerSection, ServerTLSSection, TrainSection,
)

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = REPO / ".cache" / "models"   # the real SmolLM2 conversion, shared with the demo


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two layers, hidden 64, random weights, the real SmolLM2 tokenizer (49,152 tokens)."""
    return "dir:" + str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def fed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare_federation_data(out, num_schools=3, eval_size=12, seed=0, max_per_school=24)
    return out


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A teacher with another tokenizer than the schools': two layers, random weights, the real
    Qwen2.5 tokenizer (151,936 tokens) from the packaged teacher's GGUF."""
    out = tmp_path_factory.mktemp("tiny-teacher") / "model"
    return "dir:" + str(build_tiny_model(out, "packaged:qwen2.5-coder-0.5b-instruct", seed=1, cache_dir=MODEL_CACHE))


@pytest.fixture(scope="session")
def exchange_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """School folders plus a public prompt pool (24 questions, 8 open prompts) and an
    out-of-distribution eval source."""
    out = tmp_path_factory.mktemp("exchange-data")
    prepare_federation_data(out, num_schools=3, eval_size=12, seed=0, max_per_school=24, pool_size=24,
                            ood_source="openbookqa", ood_size=8, open_pool_size=8)
    return out


TOKENS = {f"school-{k}": f"token-for-school-{k}-0123456789" for k in range(1, 6)}


@dataclasses.dataclass(frozen=True)
class Pki:
    """A federation CA made by `fedserver certs`' own code, with the coordinator's certificate
    (127.0.0.1 and localhost) and one certificate per school of TOKENS."""

    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca" / "ca.crt"

    @property
    def crl(self) -> Path:
        return self.dir / "ca" / "revoked.crl"

    def server_tls(self) -> ServerTLSSection:
        return ServerTLSSection(cert=self.dir / "server" / "server.crt", key=self.dir / "server" / "server.key",
                                client_ca=self.ca, revocation_list=self.crl)

    def school_files(self, school: str) -> tuple[Path, Path]:
        return self.dir / school / f"{school}.crt", self.dir / school / f"{school}.key"

    def school_tls(self, school: str) -> Any:
        from fedclient.config import SchoolTLSSection

        cert, key = self.school_files(school)
        return SchoolTLSSection(ca=self.ca, cert=cert, key=key)


_PKI: Pki | None = None


def pki() -> Pki:
    """The session's throwaway PKI (created at first use, deleted at exit). Never revoke in it:
    tests/test_tls.py makes its own CA for that."""
    global _PKI
    if _PKI is None:
        from fedserver.certs import init_ca

        folder = Path(tempfile.mkdtemp(prefix="schoolfed-test-pki-"))
        atexit.register(shutil.rmtree, folder, True)
        ca = init_ca(folder / "ca", name="test federation CA", days=30)
        ca.issue_server(["127.0.0.1", "localhost"], folder / "server", days=30)
        for sid in TOKENS:
            ca.issue_school(sid, folder / sid, days=30)
        _PKI = Pki(folder)
    return _PKI


def server_tls_toml(tls: bool = True) -> str:
    """The [server.tls] table of a coordinator.toml written by a test."""
    if not tls:
        return "[server.tls]\ninsecure = true\n"
    t = pki().server_tls()
    q = json.dumps
    return (f"[server.tls]\ncert = {q(str(t.cert))}\nkey = {q(str(t.key))}\nclient_ca = {q(str(t.client_ca))}\n"
            f"revocation_list = {q(str(t.revocation_list))}\n")


def school_tls_toml(school: str, tls: bool = True) -> str:
    """The [school.tls] table of a school.toml written by a test."""
    if not tls:
        return "[school.tls]\ninsecure = true\n"
    cert, key = pki().school_files(school)
    q = json.dumps
    return f"[school.tls]\nca = {q(str(pki().ca))}\ncert = {q(str(cert))}\nkey = {q(str(key))}\n"


def tls_channel(address: str, school: str, **kwargs: Any) -> Any:
    """A grpc.aio channel to a TLS coordinator with `school`'s certificate."""
    import grpc

    from common.wire import grpc_options

    cert, key = pki().school_files(school)
    creds = grpc.ssl_channel_credentials(pki().ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    return grpc.aio.secure_channel(address, creds, options=grpc_options(), **kwargs)


def coordinator_config(tmp: Path, model: str, *, schools: int = 3, eval_file: Path | None = None, tls: bool = True,
                       **sections: Any) -> CoordinatorConfig:
    """A small, fast configuration; override sections with e.g. rounds=dict(total=1). Mutual TLS
    with the session's PKI unless tls=False (plaintext on 127.0.0.1)."""
    base = CoordinatorConfig(
        server=ServerSection(listen="127.0.0.1:0", state_dir=tmp / "coordinator", heartbeat_interval_s=0.5,
                             session_timeout_s=10.0, max_upload_bytes=64 * 1024 * 1024,
                             tls=pki().server_tls() if tls else ServerTLSSection(insecure=True)),
        model=ModelSection(base=model),
        lora=LoraSection(rank=4, alpha=8.0),
        rounds=RoundsSection(total=2, min_schools=schools, quorum=max(1, schools - 1), deadline_s=120.0),
        train=TrainSection(local_steps=2, batch_size=2, learning_rate=1e-3, max_seq_len=96),
        evaluation=EvaluationSection(eval_file=eval_file, max_examples=8, school_max_examples=4, threads=1),
        schools=tuple(SchoolEntry(sid, hash_token(tok)) for sid, tok in list(TOKENS.items())[:schools]),
    )
    changes = {name: dataclasses.replace(getattr(base, name), **vals) for name, vals in sections.items()}
    return dataclasses.replace(base, **changes)


class RunningCoordinator:
    def __init__(self, coord: Any, cfg: CoordinatorConfig) -> None:
        self.coord = coord
        self.cfg = cfg
        self.address = f"127.0.0.1:{coord.port}"
        self.engine = coord.engine
        self.store = coord.store
        self.run_task: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        if self.run_task is not None and not self.run_task.done():
            self.run_task.cancel()
            await asyncio.gather(self.run_task, return_exceptions=True)
        await self.coord.stop(grace=0.5)


@pytest.fixture
async def start_coordinator() -> AsyncIterator[Callable[..., Any]]:
    """Factory: start a real coordinator; `run_rounds=False` leaves the round loop to the test."""
    from fedserver.app import create_server

    running: list[RunningCoordinator] = []

    async def factory(cfg: CoordinatorConfig, run_rounds: bool = True) -> RunningCoordinator:
        coord = await create_server(cfg)
        await coord.engine.start()
        await coord.server.start()
        rc = RunningCoordinator(coord, cfg)
        if run_rounds:
            rc.run_task = asyncio.create_task(coord.engine.run())
        running.append(rc)
        return rc

    yield factory
    for rc in running:
        await rc.stop()


def school_config(tmp: Path, address: str, school: str, fed_data: Path, model: str, tls: bool = True) -> Any:
    """A school daemon's configuration: its token and, unless tls=False, its certificate."""
    from fedclient.config import ClientModelSection, SchoolConfig, SchoolSection, SchoolTLSSection

    token_file = tmp / f"{school}.token"
    token_file.write_text(TOKENS[school] + "\n")
    d = fed_data / "schools" / school
    return SchoolConfig(
        school=SchoolSection(coordinator=address, token_file=token_file, state_dir=tmp / school,
                             data_dir=d / "train.jsonl", heldout_file=d / SCHOOL_HELDOUT, torch_threads=1,
                             max_backoff_s=0.5, tls=pki().school_tls(school) if tls else SchoolTLSSection(insecure=True)),
        model=ClientModelSection(base=model),
    )


@pytest.fixture
async def start_school() -> AsyncIterator[Callable[..., Any]]:
    """Factory: run a real school daemon in this event loop; returns (daemon, stop_event, task)."""
    from fedclient.daemon import SchoolDaemon
    from fedclient.worker import SchoolModel

    running: list[tuple[asyncio.Event, asyncio.Task[int]]] = []

    async def factory(cfg: Any) -> tuple[Any, asyncio.Event, asyncio.Task[int]]:
        s = cfg.school
        model = await asyncio.to_thread(SchoolModel, cfg.model.base, None, s.data_dir, s.heldout_file, s.torch_threads, s.state_dir,
                                    s.max_batch_tokens, s.gradient_checkpointing)
        daemon = SchoolDaemon(cfg, s.token_file.read_text().strip(), model)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        running.append((stop, task))
        return daemon, stop, task

    yield factory
    for stop, _ in running:
        stop.set()
    for _, task in running:
        try:
            await asyncio.wait_for(task, timeout=15)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
