"""Property-based tests (hypothesis): names, references, and the registry against a model.

- `validate_name` accepts exactly the documented set (1-64 of `[A-Za-z0-9._-]`, first a
  letter or digit, no `..`), and nothing it accepts can leave a folder when joined as a path.
- `parse_ref` round-trips: `str(parse_ref(x)) == x` for every accepted `x`; every refused
  input raises `BadInputError` with a one-line message.
- Random sequences of register / alias / rollback / archive on a real SQLite registry agree
  with a small in-memory model after every step.

Budgets are small (tens of examples) so the default suite stays fast.
"""

from __future__ import annotations

import shutil
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from registry.errors import BadInputError, ConflictError, NotFoundError
from registry.names import MAX_VERSION, Ref, parse_ref, validate_name

ALLOWED = set(string.ascii_letters + string.digits + "._-")
FAST = settings(max_examples=100, deadline=None)


def documented(s: str) -> bool:
    """The rule as the docs state it, written independently of the regex."""
    return (1 <= len(s) <= 64 and s[0] in string.ascii_letters + string.digits
            and all(c in ALLOWED for c in s) and ".." not in s)


# characters that matter: the allowed ones, path separators, dots, whitespace, controls,
# reference syntax, and non-ASCII look-alikes (a fullwidth digit, a Cyrillic 'а', 'é')
TRICKY = string.ascii_letters + string.digits + "._-" + "/\\ \t\n\r\x00\x1b:@~$*?%" + "１аé\u200b"
names_like = st.text(alphabet=TRICKY, max_size=70) | st.text(max_size=70)
valid_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True).filter(lambda s: ".." not in s)


@FAST
@given(names_like)
def test_validate_name_accepts_exactly_the_documented_set(s):
    if documented(s):
        assert validate_name(s) == s
    else:
        with pytest.raises(BadInputError) as err:
            validate_name(s)
        assert "\n" not in str(err.value) and str(err.value).startswith("invalid name ")


@FAST
@given(valid_names | names_like)
def test_an_accepted_name_never_leaves_its_folder(s):
    try:
        validate_name(s)
    except BadInputError:
        return
    root = Path("/srv/plait/artifacts")
    joined = root / s
    assert Path(s).parts == (s,) and s not in (".", "..")
    assert joined.parent == root
    # resolve() without touching the disk: normalise the text the way the OS would
    import os.path

    assert os.path.normpath(str(joined)) == str(joined)
    assert Path(os.path.normpath(str(joined))).parent == root


@FAST
@given(valid_names, st.one_of(st.none(), st.integers(1, MAX_VERSION)), st.one_of(st.none(), valid_names),
       st.booleans())
def test_parse_ref_round_trips_valid_refs(name, version, alias, use_alias):
    text = name
    if version is not None and not use_alias:
        text = f"{name}:{version}"
    elif alias is not None and use_alias:
        text = f"{name}@{alias}"
    ref = parse_ref(text)
    assert str(ref) == text
    assert ref.name == name
    assert isinstance(ref, Ref)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=TRICKY, max_size=40) | st.text(max_size=40) | st.from_regex(r"[a-z]{1,5}[:@][0-9a-z]{0,5}", fullmatch=True)
       | st.from_regex(r"[a-z]{1,5}:[0-9]{1,4}", fullmatch=True))
def test_parse_ref_accepts_only_what_it_can_print_back(text):
    try:
        ref = parse_ref(text)
    except BadInputError as e:
        assert "\n" not in str(e) and str(e).startswith("invalid ")
        return
    assert str(ref) == text  # accepted means canonical: no second spelling of the same version


@pytest.mark.parametrize("text", ["legal:01", "legal:007", "legal:0", "legal:+1", "legal: 1", "legal:1 "])
def test_versions_have_one_spelling(text):
    with pytest.raises(BadInputError):
        parse_ref(text)


# ----------------------------------------------------------------- the registry against a model
FP = "sha256:" + "ef" * 32
NAMES = ["law", "med"]
ALIASES = ["production", "staging"]


class RegistryModel(RuleBasedStateMachine):
    """Random register / alias / rollback / archive sequences against an in-memory model."""

    def __init__(self):
        super().__init__()
        from registry.client import Registry

        self.dir = Path(tempfile.mkdtemp(prefix="plait-prop-"))
        self.reg = Registry(f"sqlite:///{self.dir / 'r.db'}", self.dir / "artifacts")
        self.versions: dict[str, list[str]] = {n: [] for n in NAMES}  # status per version, index = number - 1
        self.aliases: dict[tuple[str, str], int] = {}
        self.events: dict[tuple[str, str], list[tuple[int, int | None]]] = {}  # (to, previous)
        self.counter = 0

    def teardown(self):
        self.reg.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(name=st.sampled_from(NAMES), same_content=st.booleans())
    def register(self, name, same_content):
        self.counter += 0 if same_content else 1
        info = self.reg.register_version(
            name, domain=name, kind="lora", base_fingerprint=FP,
            files={"adapter_config.json": b"{}", "adapter_model.safetensors": f"w{self.counter}".encode()})
        self.versions[name].append("ready")
        assert info.version == len(self.versions[name])

    @rule(name=st.sampled_from(NAMES), number=st.integers(1, 6), alias=st.sampled_from(ALIASES))
    def set_alias(self, name, number, alias):
        ref = f"{name}:{number}"
        if number > len(self.versions[name]):
            with pytest.raises(NotFoundError):
                self.reg.set_alias(ref, alias)
        elif self.versions[name][number - 1] != "ready":
            with pytest.raises(ConflictError):
                self.reg.set_alias(ref, alias)
        else:
            assert self.reg.set_alias(ref, alias).version == number
            self.events.setdefault((name, alias), []).append((number, self.aliases.get((name, alias))))
            self.aliases[(name, alias)] = number

    @rule(name=st.sampled_from(NAMES), alias=st.sampled_from(ALIASES))
    def rollback(self, name, alias):
        history = self.events.get((name, alias), [])
        if not self.versions[name]:
            with pytest.raises(NotFoundError):
                self.reg.rollback_alias(name, alias)
            return
        if not history or history[-1][1] is None:
            with pytest.raises(NotFoundError):
                self.reg.rollback_alias(name, alias)
            return
        target = history[-1][1]
        if self.versions[name][target - 1] != "ready":
            with pytest.raises(ConflictError):
                self.reg.rollback_alias(name, alias)
            return
        assert self.reg.rollback_alias(name, alias).version == target
        history.append((target, self.aliases[(name, alias)]))
        self.aliases[(name, alias)] = target

    @rule(name=st.sampled_from(NAMES), number=st.integers(1, 6))
    def archive(self, name, number):
        ref = f"{name}:{number}"
        if number > len(self.versions[name]):
            with pytest.raises(NotFoundError):
                self.reg.archive(ref)
        elif number in {v for (n, _), v in self.aliases.items() if n == name}:
            with pytest.raises(ConflictError):
                self.reg.archive(ref)
        else:
            assert self.reg.archive(ref).status == "archived"
            self.versions[name][number - 1] = "archived"

    @precondition(lambda self: any(self.versions.values()))
    @rule()
    def gc(self):
        self.reg.gc(grace_s=0)

    @invariant()
    def agrees_with_model(self):
        for name in NAMES:
            statuses = self.versions[name]
            ready = [i + 1 for i, s in enumerate(statuses) if s == "ready"]
            if ready:
                assert self.reg.get_version(name).version == ready[-1]  # NAME = newest ready version
            else:
                with pytest.raises(NotFoundError):
                    self.reg.get_version(name)
            rows = self.reg.search_versions(name=name, include_archived=True)
            assert [(v.version, v.status) for v in rows] == [(i + 1, s) for i, s in enumerate(statuses)]
            for alias in ALIASES:
                if (name, alias) in self.aliases:
                    assert self.reg.get_version(f"{name}@{alias}").version == self.aliases[(name, alias)]
                elif statuses:
                    with pytest.raises(NotFoundError):
                        self.reg.get_version(f"{name}@{alias}")
        # every ready version's artifact is intact, even after gc removed archived files
        assert all(r["ok"] for r in self.reg.verify())


TestRegistryModel = RegistryModel.TestCase
TestRegistryModel.settings = settings(max_examples=25, stateful_step_count=15, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------- data rows
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=6)
row_objects = st.dictionaries(st.sampled_from(["text", "prompt", "completion", "other"]), json_values, max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(row_objects.map(lambda o: __import__("json").dumps(o).encode()),
                                st.binary(max_size=30)), min_size=0, max_size=6))
def test_data_rows_load_or_fail_with_one_line_naming_the_place(tmp_path_factory, lines):
    """Any JSONL file either loads into rows that carry their file:line, or is refused with one
    line that names the file (and, for a bad row, the line)."""
    from training.data import Row, read_rows

    path = tmp_path_factory.mktemp("rows") / "data.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    try:
        rows = read_rows(path)
    except BadInputError as e:
        message = str(e)
        assert "\n" not in message and message.startswith(str(path)), message
        return
    assert rows and all(isinstance(r, Row) and r.where.startswith(f"{path}:") for r in rows)
    for r in rows:
        assert (r.text is not None and r.text.strip()) or (isinstance(r.prompt, str) and r.completion.strip())
