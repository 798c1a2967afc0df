"""`fedserver demo`: a whole federation on 127.0.0.1 — one coordinator and N school daemons as
separate processes — on the packaged SmolLM2 and real questions; writes report.json and report.html."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from common.config import load_toml
from common.data import SCHOOL_HELDOUT, prepare_federation_data
from common.files import write_secret
from common.models import default_cache_dir, resolve
from fedserver.auth import hash_token, new_token
from fedserver.config import CoordinatorConfig
from fedserver.report import build_report, format_table
from fedserver.report_html import write_html_report
from fedserver.store import Store


@dataclass(frozen=True)
class DemoOptions:
    schools: int = 3
    rounds: int = 3
    out: Path = Path("demo-out")
    model: str = "packaged:smollm2-135m-instruct"
    local_steps: int = 16
    learning_rate: float = 3e-4
    eval_size: int = 200
    train_per_school: int | None = None
    seed: int = 0
    cache_dir: Path | None = None
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    wrappers: tuple[dict[str, Any], ...] = ()
    proximal_mu: float = 0.0
    attackers: int = 0            # research: the last N schools send attacked updates
    attack: str = "sign_flip"
    attack_scale: float = 1.0
    timeout_s: float = 3600.0
    # The exchange channel: the coordinator's 4-bit teacher, the public prompt pool, the
    # schedule of round kinds. A schedule of only "train" runs without a teacher (FedAvg alone).
    schedule: tuple[str, ...] = ("train", "distill", "teach")
    teacher: str = "packaged:qwen2.5-coder-1.5b-instruct"
    teacher_quantization: str = "nf4"
    teacher_eval: int = 40          # held-out questions the teacher is scored on (before / after teach rounds)
    pool_size: int = 300            # public questions set aside for the exchange channel
    slice_size: int = 32            # pool questions per distill / teach round
    # the schools' steps in a distill round: a step sees batch_size pool + batch_size own questions, so 8 see what 16 train steps see
    distill_steps: int = 8
    open_pool: int = 0              # open prompts added to the pool (sequence-level KD in distill rounds)
    open_slice_size: int = 8        # open prompts per distill round, when the pool has any
    kd_weight: float = 0.5
    ood_source: str | None = "openbookqa"   # a source no school and no pool slice contains
    ood_size: int = 100
    dashboard_port: int = 8787      # the live dashboard on 127.0.0.1 (any free port if taken; 0 = any)

    @property
    def uses_teacher(self) -> bool:
        return any(k in ("distill", "teach") for k in self.schedule)


def _toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)   # strings, numbers and true/false are spelled the same in JSON and TOML


def strategy_toml(name: str, options: dict[str, Any], wrappers: tuple[dict[str, Any], ...]) -> str:
    out = [f"[strategy]\nname = {json.dumps(name)}\n"]
    if options:
        out.append("[strategy.options]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in options.items()))
    for w in wrappers:
        out.append("[[strategy.wrappers]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in w.items()))
    return "\n".join(out)


def _toml_str(p: Path | str) -> str:
    return json.dumps(str(p))  # a JSON string is a valid TOML basic string


def exchange_toml(opts: DemoOptions, out: Path, cache: Path) -> str:
    """[schedule], and with a teacher [teacher] and [distill], for the demo's coordinator."""
    text = f"[schedule]\nrounds = {_toml_value(list(opts.schedule))}\n"
    if not opts.uses_teacher:
        return text
    return text + f"""
[teacher]
model = {_toml_str(opts.teacher)}
quantization = {_toml_str(opts.teacher_quantization)}
cache_dir = {_toml_str(cache)}
threads = 2
eval_max_examples = {opts.teacher_eval}
learn_steps = 4
learn_batch = 4

[distill]
pool_file = {_toml_str(out / "data" / "public" / "pool.jsonl")}
slice_size = {opts.slice_size}
open_slice_size = {opts.open_slice_size}
local_steps = {opts.distill_steps}
max_new_tokens = 16
kd_weight = {opts.kd_weight}
"""


def _dashboard_port(wanted: int) -> int:
    """The demo's dashboard port: the one asked for if it is free, else any (the URL is printed)."""
    if wanted <= 0:
        return 0
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", wanted))
        except OSError:
            return 0
    return wanted


def write_pki(out: Path, schools: list[str]) -> tuple[str, dict[str, str]]:
    """A throwaway federation CA in OUT/pki (mutual TLS, docs/SECURITY.md): the coordinator's
    certificate for 127.0.0.1 and localhost, one per school. Returns the [server.tls] table
    and each school's [school.tls] table."""
    from fedserver.certs import CA_CERT, CRL, init_ca

    pki = out / "pki"
    if pki.is_dir() and not pki.is_symlink():   # a run that stopped before its coordinator started
        shutil.rmtree(pki)
    ca = init_ca(pki / "ca", name="School federation demo CA (throwaway)", days=30)
    cert, key, _ = ca.issue_server(["127.0.0.1", "localhost"], pki / "coordinator", days=30)
    server = (f"[server.tls]\ncert = {_toml_str(cert)}\nkey = {_toml_str(key)}\n"
              f"client_ca = {_toml_str(pki / 'ca' / CA_CERT)}\nrevocation_list = {_toml_str(pki / 'ca' / CRL)}\n")
    tables = {}
    for sid in schools:
        cert, key, _ = ca.issue_school(sid, pki / sid, days=30)
        tables[sid] = (f"[school.tls]\nca = {_toml_str(pki / sid / CA_CERT)}\ncert = {_toml_str(cert)}\n"
                       f"key = {_toml_str(key)}\n")
    return server, tables


def write_configs(opts: DemoOptions, out: Path, cache: Path) -> tuple[Path, list[Path]]:
    cfg_dir = out / "config"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    server_tls, school_tls = write_pki(out, [f"school-{k}" for k in range(1, opts.schools + 1)])
    entries, school_cfgs = [], []
    for k in range(1, opts.schools + 1):
        sid = f"school-{k}"
        tok = new_token()
        token_file = cfg_dir / f"{sid}.token"
        # 0600 from the start, never through a link planted in OUT (a re-run replaces its own file)
        write_secret(token_file, tok + "\n", overwrite=True)
        entries.append(f'[[schools]]\nid = "{sid}"\ntoken_sha256 = "{hash_token(tok)}"\n')
        school_cfgs.append((sid, token_file))
    coord = cfg_dir / "coordinator.toml"
    coord.write_text(f"""# written by `fedserver demo`
[server]
listen = "127.0.0.1:0"
state_dir = {_toml_str(out / "coordinator")}
heartbeat_interval_s = 2.0
session_timeout_s = 30.0

{server_tls}
[model]
base = {_toml_str(opts.model)}
cache_dir = {_toml_str(cache)}

[lora]
rank = 16
alpha = 32.0

[rounds]
total = {opts.rounds}
min_schools = {opts.schools}
quorum = {max(1, opts.schools - 1)}
deadline_s = 1200.0
start_timeout_s = 600.0

[train]
local_steps = {opts.local_steps}
batch_size = 8
learning_rate = {opts.learning_rate}
proximal_mu = {opts.proximal_mu}

{strategy_toml(opts.strategy, opts.strategy_options, opts.wrappers)}
{exchange_toml(opts, out, cache)}
[evaluation]
eval_file = {_toml_str(out / "data" / "eval" / "eval.jsonl")}
max_examples = {opts.eval_size}
school_max_examples = 16
threads = 1

[monitor]
metrics_listen = "127.0.0.1:0"
dashboard_listen = "127.0.0.1:{_dashboard_port(opts.dashboard_port)}"

""" + "\n".join(entries))
    paths = []
    attackers = {sid for sid, _ in school_cfgs[len(school_cfgs) - opts.attackers:]} if opts.attackers else set()
    for sid, token_file in school_cfgs:
        p = cfg_dir / f"{sid}.toml"
        attack = (f'\n[simulation]\nattack = "{opts.attack}"\nscale = {opts.attack_scale}\n' if sid in attackers else "")
        p.write_text(f"""# written by `fedserver demo`
[school]
coordinator = "COORDINATOR"
token_file = {_toml_str(token_file)}
state_dir = {_toml_str(out / "schools" / sid)}
data_dir = {_toml_str(out / "data" / "schools" / sid)}
heldout_file = {_toml_str(out / "data" / "schools" / sid / SCHOOL_HELDOUT)}
torch_threads = 1
max_backoff_s = 5.0

{school_tls[sid]}
[model]
base = {_toml_str(opts.model)}
cache_dir = {_toml_str(cache)}
{attack}""")
        paths.append(p)
    return coord, paths


def run_demo(opts: DemoOptions) -> int:
    console = Console(stderr=True)
    out = opts.out.resolve()
    cache = (opts.cache_dir or default_cache_dir()).resolve()
    with tempfile.TemporaryDirectory() as tmp:   # every configuration problem (strategy, quorum...) before any work
        load_toml(CoordinatorConfig, write_configs(opts, Path(tmp), cache)[0])
    if (out / "coordinator").exists():
        console.print(f"[red]{out} holds an earlier run; choose another --out or delete it[/red]")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    t0 = time.monotonic()

    console.print(f"[bold]1/4[/bold] preparing data for {opts.schools} schools (non-IID by exam board / source)")
    manifest = prepare_federation_data(out / "data", opts.schools, opts.eval_size, opts.seed,
                                       max_per_school=opts.train_per_school,
                                       pool_size=opts.pool_size,   # carved out either way: runs with and without a teacher see the same schools
                                       ood_source=opts.ood_source, ood_size=opts.ood_size,
                                       open_pool_size=opts.open_pool if opts.pool_size else 0)
    console.print(f"      eval set: {opts.eval_size} held-out questions; schools: "
                  + ", ".join(f"{s['name']}={s['train']} questions" for s in manifest["schools"]))

    console.print(f"[bold]2/4[/bold] resolving model {opts.model} (the first run converts the GGUF, ~1 min)")
    resolve(opts.model, cache)
    if opts.uses_teacher:
        console.print(f"      and the teacher {opts.teacher} ({opts.teacher_quantization} at the coordinator; "
                      "the first run assembles and converts its GGUF, ~2 min)")
        resolve(opts.teacher, cache)

    coord_cfg, school_cfgs = write_configs(opts, out, cache)
    console.print(f"[bold]3/4[/bold] starting the coordinator and {opts.schools} school daemons on 127.0.0.1")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    port_file = out / "coordinator.addr"
    port_file.unlink(missing_ok=True)    # a stale address from an earlier run must not be read
    try:
        log = open(out / "logs" / "coordinator.log", "wb")
        coord = subprocess.Popen([sys.executable, "-m", "fedserver.cli", "serve", "--config", str(coord_cfg),
                                  "--checkpoint-dir", str(out / "rounds"), "--port-file", str(port_file)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append(("coordinator", coord))
        while not port_file.exists():
            if coord.poll() is not None:
                raise RuntimeError(f"coordinator exited early; see {out / 'logs' / 'coordinator.log'}")
            time.sleep(0.2)
        address = port_file.read_text().strip()
        monitor = out / "coordinator" / "monitor.json"
        if monitor.exists():   # written before the port file
            urls = json.loads(monitor.read_text())
            if urls.get("dashboard"):
                console.print(f"      live dashboard: [bold]{urls['dashboard']}[/bold]   metrics: {urls.get('metrics') or 'off'}")
        for p in school_cfgs:
            p.write_text(p.read_text().replace("COORDINATOR", address))
            slog = open(out / "logs" / f"{p.stem}.log", "wb")
            procs.append((p.stem, subprocess.Popen([sys.executable, "-m", "fedclient.cli", "run", "--config", str(p)],
                                                   stdout=slog, stderr=subprocess.STDOUT, env=env)))
        kinds = ", ".join(f"{n}:{opts.schedule[(n - 1) % len(opts.schedule)]}" for n in range(1, opts.rounds + 1))
        console.print(f"[bold]4/4[/bold] running {opts.rounds} rounds ({kinds}; logs in {out / 'logs'})")
        _watch(console, out, coord, opts, t0)
        eval_name = "held-out questions of the schools' sources" + (f" (without {opts.ood_source})" if opts.ood_source else "")
        state = Store(out / "coordinator" / "state.sqlite", readonly=True)
        report = build_report(state, opts.model, eval_name,
                              teacher=(opts.teacher, opts.teacher_quantization) if opts.uses_teacher else None)
        evals = state.evals()   # the per-school lines of report.html's accuracy plot
        state.close()
        if opts.ood_source:
            console.print(f"      scoring the base model and the last adapter on {opts.ood_size} {opts.ood_source} questions "
                          "(a source no school trains on)")
            report["ood"] = _score_ood(out, opts, cache, report)
        report["seconds_total"] = round(time.monotonic() - t0, 1)
        report["manifest"] = {"schools": opts.schools, "seed": opts.seed}
        (out / "report.json").write_text(json.dumps(report, indent=2))
        page = write_html_report(report, out, evals)
        print(format_table(report), flush=True)
        if report.get("ood"):
            o = report["ood"]
            print(f"out-of-distribution ({o['source']}, {o['count']} questions): base {o['base_accuracy']:.3f} -> "
                  f"round {o['round']} adapter {o['adapter_accuracy']:.3f}", flush=True)
        committed = [r for r in report["rounds"] if r["status"] == "committed"]
        last = committed[-1]["eval_accuracy"] if committed else None
        base = report["base_eval_accuracy"]
        if last is not None and base is not None:
            verdict = "beats" if last > base else "does NOT beat"
            console.print(f"tuned adapter (round {committed[-1]['round']}) {verdict} the base model: {last:.3f} vs {base:.3f}")
        console.print(f"report: {out / 'report.json'} and {page}   adapters: {out / 'rounds'}/<round>/adapter   total {report['seconds_total']:.0f} s")
        return 0 if coord.returncode == 0 and len(committed) == opts.rounds else 1
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _score_ood(out: Path, opts: DemoOptions, cache: Path, report: dict[str, Any]) -> dict[str, Any] | None:
    """Base model and the last committed adapter on the out-of-distribution source."""
    from peft import PeftModel

    from common.data import read_jsonl
    from common.evaluation import evaluate_choices
    from common.models import load_model

    committed = [r for r in report["rounds"] if r["status"] == "committed" and (out / "rounds" / str(r["round"]) / "adapter").is_dir()]
    if not committed:
        return None
    questions = read_jsonl(out / "data" / "eval" / "ood.jsonl")
    model, tok = load_model(opts.model, cache)
    base = evaluate_choices(model, tok, questions)
    last = committed[-1]["round"]
    tuned = evaluate_choices(PeftModel.from_pretrained(model, str(out / "rounds" / str(last) / "adapter")), tok, questions)
    return {"source": opts.ood_source, "count": len(questions), "round": last,
            "base_accuracy": base.accuracy, "base_loss": base.loss, "adapter_accuracy": tuned.accuracy, "adapter_loss": tuned.loss}


def _watch(console: Console, out: Path, coord: subprocess.Popen[bytes], opts: DemoOptions, t0: float) -> None:
    db = out / "coordinator" / "state.sqlite"
    live = out / "coordinator" / "live.json"
    seen: set[str] = set()
    last_live = 0.0
    with console.status("waiting for schools to join…") as status:
        while coord.poll() is None:
            if time.monotonic() - t0 > opts.timeout_s:
                raise TimeoutError(f"demo did not finish within {opts.timeout_s:.0f} s")
            time.sleep(1.0)
            if not db.exists():
                continue
            store = Store(db, readonly=True)
            try:
                rounds = store.rounds()
                evals = store.evals()
            finally:
                store.close()
            for e in evals:
                key = f"eval-{e['round']}-{e['source']}"
                if e["source"] in ("server", "teacher") and key not in seen:
                    seen.add(key)
                    if e["source"] == "teacher":
                        what = "the teacher" + (" before it learned" if e["round"] == 0 else f" after teach round {e['round']}")
                    else:
                        what = "base model" if e["round"] == 0 else f"round {e['round']} adapter"
                    console.print(f"  [{time.monotonic() - t0:5.0f}s] held-out eval of {what}: accuracy {e['metrics']['accuracy']:.3f}, "
                                  f"loss {e['metrics']['loss']:.3f}")
            for r in rounds:
                key = f"round-{r.round}-{r.status}"
                if key not in seen and r.status != "open":
                    seen.add(key)
                    console.print(f"  [{time.monotonic() - t0:5.0f}s] round {r.round} ({r.kind}) {r.status}: "
                                  f"{int(r.metrics.get('updates', r.metrics.get('answer_sets', 0)))}/{len(r.participants)} results, "
                                  + (f"train loss {r.metrics['train_loss']:.3f}, " if "train_loss" in r.metrics else "")
                                  + f"{r.metrics.get('seconds', 0):.0f} s")
            if time.monotonic() - last_live > 20 and live.exists():   # a heartbeat line during long rounds
                last_live = time.monotonic()
                try:
                    now = json.loads(live.read_text())
                except ValueError:
                    now = {}
                if now.get("round"):
                    console.print(f"  [{time.monotonic() - t0:5.0f}s] round {now['round']}: "
                                  + ", ".join(f"{k} {v}" for k, v in now["schools"].items()))
            current = [r for r in rounds if r.status == "open"]
            status.update(f"round {current[0].round} ({current[0].kind}) open at {len(current[0].participants)} schools…" if current
                          else "between rounds: evaluating, or the teacher is labelling the next pool slice…")
    if coord.returncode != 0:
        raise RuntimeError(f"coordinator exited with {coord.returncode}; see {out / 'logs' / 'coordinator.log'}")
