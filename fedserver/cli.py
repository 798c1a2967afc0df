"""`fedserver serve | demo | status | report | token | certs | prepare-data`: the operator's entry point.
Exit codes: 0 done or stopped, 1 crash (systemd restarts), 78 configuration error."""

from __future__ import annotations

import argparse
import collections
import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from common.config import load_toml
from common.errors import ConfigError
from common.logs import configure_logging, get_logger
from common.preflight import raise_problems

EXIT_CONFIG = 78


def _serve(args: argparse.Namespace) -> int:
    from fedserver import preflight
    from fedserver.config import CoordinatorConfig

    cfg = load_toml(CoordinatorConfig, args.config)
    warnings = preflight.require(cfg, str(args.config), args.checkpoint_dir)   # before anything heavy: exit 78, not a crash
    configure_logging(cfg.server.log_level)
    for w in warnings:
        get_logger("coordinator").warning(w)
    from fedserver.app import serve

    return asyncio.run(serve(cfg, args.checkpoint_dir, args.port_file))


def _check(args: argparse.Namespace) -> int:
    from fedserver.config import CoordinatorConfig

    from fedserver import preflight

    cfg = load_toml(CoordinatorConfig, args.config)
    problems, warnings = preflight.check(cfg)   # what `serve` would refuse on this machine
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    raise_problems(str(args.config), problems)
    tls = "plaintext gRPC ([server.tls] insecure)" if cfg.server.tls.insecure else "mutual TLS"
    print(f"{args.config}: ok ({len(cfg.schools)} schools, strategy {cfg.strategy.name}, model {cfg.model.base}, {tls})")
    return 0


def _token(args: argparse.Namespace) -> int:
    from fedserver.auth import hash_token, new_token

    tok = new_token()
    if args.out:
        write_secret(args.out, tok + "\n", force=args.force)
        print(f"# token written to {args.out} (give it to the school; keep it secret)")
    else:
        print(f"# school token (give it to the school's token_file): {tok}")
    print(f'[[schools]]\nid = "{args.school}"\ntoken_sha256 = "{hash_token(tok)}"')
    return 0


def write_secret(path: Path, text: str, force: bool = False) -> None:
    """Create `path` with mode 0600 and write `text` (common.files.write_secret): never through a
    symlink, an existing file refused unless `force`, which replaces a regular file's content."""
    from common.files import write_secret as create_secret

    create_secret(path, text, overwrite=force,
                  hint="choose another --out" + ("" if force else ", or pass --force to replace a regular file"))


def _read_state(state_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(report, schools, evaluations) from a coordinator's state, read-only (it may be running)."""
    from fedserver.report import build_report
    from fedserver.store import Store

    db = state_dir / "state.sqlite"
    if not db.exists():
        raise ConfigError(f"no coordinator state at {db}")
    store = Store(db, readonly=True)
    try:
        return build_report(store, model="", eval_name=""), store.schools(), store.evals()
    finally:
        store.close()


STATUS_NAMES = 20   # `fedserver status` names schools up to this many; beyond, it counts them


def _some(names: list[str], total: int | None = None) -> str:
    """Names, or past STATUS_NAMES the count and the first few (10,000 schools are not a line)."""
    total = len(names) if total is None else total
    if total <= STATUS_NAMES and len(names) == total:
        return ", ".join(names)
    return f"{total} schools" + (f" ({', '.join(names[:5])}, ...)" if names else "")


def _status(args: argparse.Namespace) -> int:
    from fedserver.report import format_table

    report, schools, _ = _read_state(args.state_dir)
    live = read_live(args.state_dir / "live.json")
    if args.json:   # one JSON document, for jq
        print(json.dumps({**report, "schools": schools, "live": live}, indent=2))
        return 0
    print(format_table(report))
    print(f"schools that joined at least once: {_some([s['id'] for s in schools]) or '(none yet)'}")
    if live is not None and not live["stale"]:
        connected = list(live.get("schools", {}))
        print(f"coordinator now: {live.get('phase', '?')}; connected: "
              f"{_some(connected, live.get('connected', len(connected))) or 'no school'}")
    if live is not None:
        age = "of unknown age" if live["age_s"] is None else f"as of {live['age_s']:.0f} s ago"
        when = (f" ({age}; the coordinator is not running or not writing {args.state_dir / 'live.json'})"
                if live["stale"] else "")
        if live.get("round"):
            states = live.get("schools", {})
            if len(states) <= STATUS_NAMES:
                line = ", ".join(f"{k}: {v}" for k, v in states.items())
            else:   # thousands of schools: how many are doing what
                counts = collections.Counter(str(v) for v in states.values())
                connected = live.get("connected", len(states))
                listed = (f" (of {connected} connected; live.json lists the first {len(states)})"
                          if connected > len(states) else "")
                line = f"{len(states)} schools{listed}: " + ", ".join(f"{v} {n}" for v, n in counts.most_common())
            print(f"round {live['round']} open{when}: " + line)
        elif live["stale"]:
            print(f"live view{when}")
    return 0


LIVE_STALE_S = 10.0   # live.json is rewritten every 2 s while the coordinator runs


def read_live(path: Path, now: float | None = None) -> dict[str, Any] | None:
    """The coordinator's live view (live.json) with its age: `age_s`, and `stale` when it is
    older than LIVE_STALE_S (the coordinator stopped, or is stuck). None without a readable file."""
    import time

    try:
        live = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(live, dict):
        return None
    written = live.get("time")
    age = (time.time() if now is None else now) - written if isinstance(written, (int, float)) else None
    return {**live, "age_s": None if age is None else round(age, 1), "stale": age is None or age > LIVE_STALE_S}


def _report(args: argparse.Namespace) -> int:
    from fedserver.report_html import carry_over, write_html_report

    report, _, evals = _read_state(args.state_dir)
    out = args.out if args.out is not None else args.state_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        report = carry_over(report, out / "report.json")   # a demo's report.json: its model names and extras stay
        (out / "report.json").write_text(json.dumps(report, indent=2))
        page = write_html_report(report, out, evals)
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {out}: {exc.strerror or exc}; choose a folder this user "
                          "can write with --out") from None
    print(f"report: {out / 'report.json'}")
    print(f"page:   {page}")
    for png in sorted((out / "plots").glob("*.png")):
        print(f"plot:   {png}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from common.data import prepare_federation_data

    manifest = prepare_federation_data(args.out, args.schools, args.eval_size, args.seed, by=args.split,
                                       max_per_school=args.max_per_school, pool_size=args.pool,
                                       ood_source=args.ood_source, ood_size=args.ood_size,
                                       open_pool_size=args.open_pool, open_source=args.open_source)
    print(json.dumps({k: manifest[k] for k in manifest if k in ("schools", "eval", "counts", "public_pool", "ood")},
                     indent=2, default=str))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """Score a base model, with or without a saved PEFT adapter, on a JSONL question file."""
    import torch
    from peft import PeftModel

    from common.data import read_jsonl, spread
    from common.evaluation import evaluate_choices
    from common.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    questions = spread(read_jsonl(args.eval_file), args.max_examples)   # evenly spaced: a mix of sources
    if args.quantization != "none":   # e.g. a teacher as the coordinator loads it
        from transformers import AutoModelForCausalLM

        from common.models import load_tokenizer, resolve
        from fedserver.teacher import bnb_config, no_cpu_repack

        model = AutoModelForCausalLM.from_pretrained(resolve(args.model, args.cache_dir), dtype=torch.float32,
                                                     quantization_config=bnb_config(args.quantization), device_map="cpu")
        no_cpu_repack(model)   # as the coordinator's teacher runs
        tok = load_tokenizer(args.model, args.cache_dir)
    else:
        model, tok = load_model(args.model, args.cache_dir)
    from common.lora import MERGED_FILE, BaseMerge
    from common.wire import bytes_to_tensors

    merged_file = args.adapter.parent / MERGED_FILE if args.adapter is not None else None
    if merged_file is not None and not merged_file.exists():
        merged_file = None
    if args.adapter is not None:
        model = PeftModel.from_pretrained(model, str(args.adapter))
    if merged_file is not None:   # FLoRA / FedEx-LoRA checkpoints: the base weights carry a merged delta
        BaseMerge().sync(model, bytes_to_tensors(merged_file.read_bytes()))
    r = evaluate_choices(model, tok, questions)
    print(json.dumps({"model": args.model, "quantization": args.quantization, "adapter": str(args.adapter) if args.adapter else None,
                      "merged_base_delta": str(merged_file) if merged_file else None,
                      "eval_file": str(args.eval_file), "count": r.count, "accuracy": r.accuracy, "loss": r.loss}))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fedserver.demo import DemoOptions, run_demo

    opts = DemoOptions(schools=args.schools, rounds=args.rounds, out=args.out, model=args.model,
                       local_steps=args.local_steps, eval_size=args.eval_size, train_per_school=args.train_per_school,
                       seed=args.seed, cache_dir=args.cache_dir, strategy=args.strategy, learning_rate=args.learning_rate,
                       strategy_options=_json_arg(args.strategy_options, dict, "--strategy-options"),
                       wrappers=tuple(_json_arg(args.wrappers, list, "--wrappers")), proximal_mu=args.proximal_mu,
                       attackers=args.attackers, attack=args.attack, attack_scale=args.attack_scale,
                       schedule=tuple(k.strip() for k in args.schedule.split(",") if k.strip()), teacher=args.teacher,
                       teacher_quantization=args.teacher_quantization, teacher_eval=args.teacher_eval,
                       pool_size=args.pool_size, slice_size=args.slice_size, kd_weight=args.kd_weight,
                       open_pool=args.open_pool, open_slice_size=args.open_slice_size, distill_steps=args.distill_steps,
                       ood_source=args.ood_source or None, dashboard_port=args.dashboard_port)
    if args.rounds is None:
        opts = dataclasses.replace(opts, rounds=len(opts.schedule))
    return run_demo(opts)


def _json_arg(text: str, kind: type, flag: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{flag}: not valid JSON ({exc})") from None
    if not isinstance(value, kind):
        raise ConfigError(f"{flag}: expected a JSON {kind.__name__}")
    return value


def _strategies(args: argparse.Namespace) -> int:
    from fedserver.strategy import STRATEGY_GROUP, WRAPPER_GROUP, available, lookup

    for group, wrapper in ((STRATEGY_GROUP, False), (WRAPPER_GROUP, True)):
        print("wrappers:" if wrapper else "strategies:")
        for name in available(group):
            cls = lookup(name, wrapper=wrapper)
            fields = ", ".join(f"{k}={v!r}" for k, v in vars(cls.Options()).items())   # every option, at its default
            print(f"  {name:<18} {cls.summary}")
            if fields:
                print(f"  {'':<18} options: {fields}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedserver", description="School federation: the coordinator")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the coordinator")
    s.add_argument("--config", type=Path, required=True, help="coordinator.toml")
    s.add_argument("--checkpoint-dir", type=Path, default=None, help="where round adapters go (default STATE_DIR/rounds)")
    s.add_argument("--port-file", type=Path, default=None, help="write host:port here once bound (useful with port 0)")
    s.set_defaults(fn=_serve)
    c = sub.add_parser("check-config", help="load and validate a coordinator.toml, report every problem")
    c.add_argument("--config", type=Path, required=True)
    c.set_defaults(fn=_check)
    t = sub.add_parser("token", help="enrol a school: print a new token and its [[schools]] entry")
    t.add_argument("--school", required=True)
    t.add_argument("--out", type=Path, default=None,
                   help="write the token to this new file (mode 0600; an existing file or a symlink is refused)")
    t.add_argument("--force", action="store_true", help="with --out: replace an existing regular file")
    t.set_defaults(fn=_token)
    st = sub.add_parser("status", help="rounds, metrics and schools from a coordinator's state (read-only)")
    st.add_argument("--state-dir", type=Path, required=True)
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=_status)
    rp = sub.add_parser("report", help="report.json, report.html and plots/*.png from a coordinator's state (read-only)")
    rp.add_argument("--state-dir", type=Path, required=True)
    rp.add_argument("--out", type=Path, default=None, help="where to write them (default: the state dir)")
    rp.set_defaults(fn=_report)
    pr = sub.add_parser("prepare-data", help="write non-IID school folders and a held-out eval set")
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--schools", type=int, default=3)
    pr.add_argument("--eval-size", type=int, default=200)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--split", choices=["group", "iid"], default="group")
    pr.add_argument("--max-per-school", type=int, default=None)
    pr.add_argument("--pool", type=int, default=0, metavar="N",
                    help="set aside N public questions as the distillation prompt pool (public/pool.jsonl)")
    pr.add_argument("--ood-source", default=None, choices=["arc_easy", "arc_challenge", "sciq", "openbookqa"],
                    help="keep this source out of schools, pool and eval; write eval/ood.jsonl from it")
    pr.add_argument("--ood-size", type=int, default=200)
    pr.add_argument("--open-pool", type=int, default=0, metavar="N",
                    help="add N open-ended prompts (no options) to the pool: sequence-level distillation material")
    pr.add_argument("--open-source", default="naturalqs_open", choices=["naturalqs_open", "gsm8k"],
                    help="where the open prompts come from (a source no school trains on)")
    pr.set_defaults(fn=_prepare)
    e = sub.add_parser("evaluate", help="score a base model (and optionally a saved adapter) on held-out questions")
    e.add_argument("--model", default="packaged:smollm2-135m-instruct")
    e.add_argument("--adapter", type=Path, default=None, help="a PEFT adapter directory, e.g. demo-out/rounds/3/adapter")
    e.add_argument("--eval-file", type=Path, required=True)
    e.add_argument("--max-examples", type=int, default=0, help="0 = all")
    e.add_argument("--cache-dir", type=Path, default=None)
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--quantization", choices=["none", "nf4", "int8"], default="none",
                   help="load the model through bitsandbytes, as the coordinator loads its teacher")
    e.set_defaults(fn=_evaluate)
    d = sub.add_parser("demo", help="a whole localhost federation on the packaged SmolLM2 and real data")
    d.add_argument("--schools", type=int, default=3)
    d.add_argument("--rounds", type=int, default=None, help="default: one pass of --schedule")
    d.add_argument("--out", type=Path, default=Path("demo-out"))
    d.add_argument("--model", default="packaged:smollm2-135m-instruct")
    d.add_argument("--local-steps", type=int, default=16)
    d.add_argument("--learning-rate", type=float, default=3e-4)
    d.add_argument("--eval-size", type=int, default=200)
    d.add_argument("--train-per-school", type=int, default=None, help="cap each school's training questions")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--strategy", default="fedavg", help="a registered strategy (`fedserver strategies` lists them)")
    d.add_argument("--strategy-options", default="{}", help='JSON table for [strategy.options], e.g. \'{"server_lr": 0.01}\'')
    d.add_argument("--wrappers", default="[]", help='JSON list of [[strategy.wrappers]], e.g. \'[{"name": "clip", "max_norm": 1.0}]\'')
    d.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx: the schools' proximal term (0 = off)")
    d.add_argument("--attackers", type=int, default=0, help="research: how many schools send attacked updates")
    d.add_argument("--attack", choices=["sign_flip", "scale"], default="sign_flip")
    d.add_argument("--attack-scale", type=float, default=1.0)
    d.add_argument("--cache-dir", type=Path, default=None, help="converted-model cache")
    d.add_argument("--schedule", default="train,distill,teach",
                   help="round kinds in order, repeated: train, distill (the teacher teaches), teach (the schools teach "
                        "the teacher), evaluate; 'train' alone runs without a teacher")
    d.add_argument("--teacher", default="packaged:qwen2.5-coder-1.5b-instruct", help="the coordinator's model spec")
    d.add_argument("--teacher-quantization", choices=["nf4", "int8", "none"], default="nf4")
    d.add_argument("--teacher-eval", type=int, default=40, help="held-out questions the teacher is scored on")
    d.add_argument("--pool-size", type=int, default=300, help="public questions set aside as the prompt pool")
    d.add_argument("--slice-size", type=int, default=32, help="pool questions per distill / teach round")
    d.add_argument("--distill-steps", type=int, default=8,
                   help="the schools' local steps in a distill round (0 = --local-steps); a distill step costs ~2 train steps")
    d.add_argument("--open-pool", type=int, default=0,
                   help="open-ended prompts (NaturalQuestions-open) added to the pool: distill rounds then also "
                        "train the schools on the teacher's generated answers (costs teacher generation time)")
    d.add_argument("--open-slice-size", type=int, default=8, help="open prompts per distill round")
    d.add_argument("--kd-weight", type=float, default=0.5, help="distill rounds: share of the loss from the teacher")
    d.add_argument("--ood-source", default="openbookqa", help="a source kept from schools and pool, scored at the end ('' = none)")
    d.add_argument("--dashboard-port", type=int, default=8787,
                   help="the live dashboard on 127.0.0.1 (any free port when taken; the URL is printed)")
    d.set_defaults(fn=_demo)
    from fedserver.certs import add_parser as add_certs_parser

    add_certs_parser(sub)   # fedserver certs init-ca | issue-school | issue-server | list | revoke
    ls = sub.add_parser("strategies", help="list the registered strategies and wrappers with their options")
    ls.set_defaults(fn=_strategies)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        print(f"fedserver: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:
        get_logger("coordinator").error("crashed", error=repr(exc))
        raise


if __name__ == "__main__":
    sys.exit(main())
