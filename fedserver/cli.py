"""`fedserver serve | demo | status | token | prepare-data`: the operator's entry point.
Exit codes: 0 done or stopped, 1 crash (systemd restarts), 78 configuration error."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from common.config import load_toml
from common.errors import ConfigError
from common.logs import configure_logging, get_logger

EXIT_CONFIG = 78


def _serve(args: argparse.Namespace) -> int:
    from fedserver.app import serve
    from fedserver.config import CoordinatorConfig

    cfg = load_toml(CoordinatorConfig, args.config)
    configure_logging(cfg.server.log_level)
    return asyncio.run(serve(cfg, args.checkpoint_dir, args.port_file))


def _check(args: argparse.Namespace) -> int:
    from fedserver.config import CoordinatorConfig

    cfg = load_toml(CoordinatorConfig, args.config)
    print(f"{args.config}: ok ({len(cfg.schools)} schools, strategy {cfg.strategy.name}, model {cfg.model.base})")
    return 0


def _token(args: argparse.Namespace) -> int:
    from fedserver.auth import hash_token, new_token

    tok = new_token()
    if args.out:
        args.out.write_text(tok + "\n")
        args.out.chmod(0o600)
        print(f"# token written to {args.out} (give it to the school; keep it secret)")
    else:
        print(f"# school token (give it to the school's token_file): {tok}")
    print(f'[[schools]]\nid = "{args.school}"\ntoken_sha256 = "{hash_token(tok)}"')
    return 0


def _status(args: argparse.Namespace) -> int:
    from fedserver.report import build_report, format_table
    from fedserver.store import Store

    db = args.state_dir / "state.sqlite"
    if not db.exists():
        raise ConfigError(f"no coordinator state at {db}")
    store = Store(db, readonly=True)
    report = build_report(store, model="", eval_name="")
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    print(f"schools: {', '.join(s['id'] for s in store.schools()) or '(none yet)'}")
    live = args.state_dir / "live.json"
    if live.exists():
        now = json.loads(live.read_text())
        if now.get("round"):
            print(f"round {now['round']} open: " + ", ".join(f"{k}: {v}" for k, v in now["schools"].items()))
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
                       ood_source=args.ood_source or None)
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
    t.add_argument("--out", type=Path, default=None, help="write the token to this file (mode 0600)")
    t.set_defaults(fn=_token)
    st = sub.add_parser("status", help="rounds, metrics and schools from a coordinator's state (read-only)")
    st.add_argument("--state-dir", type=Path, required=True)
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=_status)
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
    d.set_defaults(fn=_demo)
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
