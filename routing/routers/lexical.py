"""Lexical router: a multinomial naive Bayes model of each domain's words and word pairs.

Multinomial naive Bayes text classification (McCallum and Nigam 1998, "A Comparison of Event
Models for Naive Bayes Text Classification"), with the log term-frequency transform of
Rennie et al. 2003 ("Tackling the Poor Assumptions of Naive Bayes Text Classifiers"):

    features(x)   = log(1 + count of each hashed unigram and bigram of x)
    log P(w | d)  = log((n_dw + alpha) / (n_d + alpha * buckets))      (Lidstone smoothing)
    logit_d(x)    = sum_w features_w(x) log P(w | d) / sum_w features_w(x)

Words are lower-cased runs of letters and digits; words and adjacent pairs are hashed (CRC-32,
stable across processes and machines) into `buckets` counters, so there is no vocabulary to
share: a domain's state is its own counts alone, and `add_domain` never touches another
domain's (the priors are uniform for the same reason). The state is stored sparse (the
non-zero buckets). Probabilities are softmax(logit / temperature), temperature 0.1 per mean
token log-likelihood.

Alone it is a fast router (well under a millisecond per query) that uses the whole input,
however long; it is half of the default `hybrid` router, which adds sentence-embedding
prototypes and their out-of-domain fallback.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

from registry.errors import BadInputError
from routing.routers import RouterCore, check_texts

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
DEFAULT_BUCKETS = 1 << 18


def hashed_terms(text: str, buckets: int, bigrams: bool = True) -> dict[int, float]:
    """{bucket: log(1 + count)} of the text's words (and adjacent word pairs)."""
    import math

    words = WORD.findall(text.lower())
    terms = words + ([f"{a} {b}" for a, b in zip(words, words[1:])] if bigrams else [])
    counts: dict[int, int] = {}
    for t in terms:
        h = zlib.crc32(t.encode()) % buckets
        counts[h] = counts.get(h, 0) + 1
    return {h: math.log1p(c) for h, c in counts.items()}


class LexicalRouter(RouterCore):
    """Route by a per-domain multinomial naive Bayes over hashed words and word pairs.

    Args:
        alpha: Lidstone smoothing added to every bucket's count (0.03: chosen on a validation
            split of the BBC training pool, see docs/benchmarks.md).
        buckets: hash buckets (2**18).
        bigrams: also count adjacent word pairs.
        temperature: softmax temperature over mean token log-likelihoods.
    """

    kind = "lexical"

    def __init__(self, alpha: float = 0.03, buckets: int = DEFAULT_BUCKETS, bigrams: bool = True,
                 temperature: float = 0.1, threshold: float = 0.0):
        super().__init__(temperature=temperature, threshold=threshold)
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
            raise BadInputError(f"alpha={alpha!r} must be a positive number (e.g. 0.03)")
        if isinstance(buckets, bool) or not isinstance(buckets, int) or not 1 << 10 <= buckets <= 1 << 24:
            raise BadInputError(f"buckets={buckets!r} must be an integer in 1024..16777216 (e.g. 262144)")
        self.alpha, self.buckets, self.bigrams = float(alpha), buckets, bool(bigrams)
        self.counts: dict[str, tuple[Any, Any]] = {}  # domain -> (bucket indices int64, counts float32)
        self._table = None  # cached sparse log P(w | d) of the domains in _table_domains (see _log_probs)
        self._table_domains: list[str] = []

    def _reset(self) -> None:
        self.counts, self._table = {}, None

    def _add(self, domain: str, data: Sequence[str]) -> None:
        import torch

        texts = check_texts(data, f"text of domain {domain!r}")
        if not texts:
            raise BadInputError(f"domain {domain!r} has no texts: give at least one text")
        total: dict[int, float] = {}
        for t in texts:
            for h, v in hashed_terms(t, self.buckets, self.bigrams).items():
                total[h] = total.get(h, 0.0) + v
        idx = sorted(total)
        self.counts[domain] = (torch.tensor(idx, dtype=torch.int64),
                               torch.tensor([total[h] for h in idx], dtype=torch.float32))

    def _log_probs(self):
        """The word model of every domain as (S, c): log P(w | d) = log(alpha) + S[d, w] + c[d].

        S is sparse (scipy CSC, [n_domains, buckets]): S[d, w] = log1p(n_dw / alpha) is 0 where
        the domain never saw the bucket, so memory is the domains' non-zero counts, not
        n_domains x buckets (1 MiB a domain dense), and a new domain appends one row instead of
        rebuilding the table. c[d] = -log(n_d + alpha * buckets).
        """
        import numpy as np
        import scipy.sparse as sp

        if self._table is None or self._table[0].shape[0] != len(self.domains):
            done = 0 if self._table is None else self._table[0].shape[0]
            if done and self._table_domains != self.domains[:done]:
                done = 0  # the order changed (a reload, a reset): build from scratch
            new = [self.counts[d] for d in self.domains[done:]]
            counts = [val.double().numpy() for _, val in new]
            rows = _csr([idx.numpy() for idx, _ in new], [np.log1p(v / self.alpha) for v in counts], self.buckets)
            consts = np.array([-np.log(v.sum() + self.alpha * self.buckets) for v in counts], dtype=np.float64)
            # kept column-major: S.T is then row-major for free, the layout the product with the
            # texts' rows wants (a row-major S was converted on every scoring call)
            rows = sp.vstack([self._table[0], rows], format="csc") if done else rows.tocsc()
            consts = np.concatenate([self._table[1], consts]) if done else consts
            self._table = (rows, consts)
            self._table_domains = list(self.domains)
        return self._table

    def _features(self, texts: list[str]):
        """Sparse [len(texts), buckets] of each text's term weights divided by their sum."""
        from routing.routers._features import cached_term_arrays

        pairs = cached_term_arrays(texts, self.buckets, self.bigrams, hashed_terms)
        return _csr([i for i, _ in pairs], [v / v.sum() if len(v) else v for _, v in pairs], self.buckets)

    def _score_logits(self, texts: list[str]):
        """Mean log P(w | d) over each text's weighted terms, every domain in one sparse product:
        sum_w f_w (log alpha + S[d, w] + c[d]) / sum_w f_w = log alpha + c[d] + (F S^T)[., d]."""
        import math

        import numpy as np
        import torch

        S, c = self._log_probs()
        q = self._features(texts)
        out = np.asarray((q @ S.T).todense(), dtype=np.float64) + (c + math.log(self.alpha))[None, :]
        empty = np.diff(q.indptr) == 0  # a text without words scores 0 everywhere, as before
        out[empty] = 0.0
        return torch.from_numpy(out).float()

    def _domain_tensors(self, domain: str) -> dict[str, Any]:
        idx, val = self.counts[domain]
        return {"buckets": idx, "counts": val}

    def _load_domain_tensors(self, domain: str, tensors: dict[str, Any]) -> None:
        self.counts[domain] = (tensors["buckets"], tensors["counts"])
        self._table = None

    def _params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "buckets": self.buckets, "bigrams": self.bigrams}


def _csr(indices: list, values: list, buckets: int):
    """One CSR matrix [len(indices), buckets] whose row i holds values[i] at indices[i], built in
    one call (not one small matrix per row, stacked: thousands of domains or texts)."""
    import numpy as np
    import scipy.sparse as sp

    indptr = np.zeros(len(indices) + 1, dtype=np.int64)
    np.cumsum([len(i) for i in indices], out=indptr[1:])
    cat = (lambda parts, dtype: np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype))
    return sp.csr_matrix((cat(values, np.float64), cat(indices, np.int64), indptr), shape=(len(indices), buckets))


ROUTER_CLASS = LexicalRouter
