"""Tokenizers the trainer speaks: a character tokenizer for the built-in student, and a
thin wrapper around a transformers tokenizer for students loaded from a path.

Both expose the same small surface (`encode`, `decode`, `bos_id`, `eos_id`, `pad_id`,
`vocab_size`, `fingerprint`), so rollouts, experts and objectives never ask which one
they hold. The fingerprint names the vocabulary: an expert whose tokenizer differs from
the student's is refused by comparing it (`check_same_vocabulary`).
"""

from __future__ import annotations

import hashlib
from typing import Protocol

# Printable ASCII and the newline: everything tasks write (see distil.tasks.base).
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class CharTokenizer:
    """One token per character of printable ASCII and "\\n", after three specials.

    Ids: 0 padding, 1 begin-of-sequence, 2 end-of-response; characters from 3. Single
    characters as tokens let a task's oracle, which thinks in characters, speak tokens.
    """

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 3 + len(CHARACTERS)
    single_characters = True

    def __init__(self) -> None:
        self._ids = {c: 3 + i for i, c in enumerate(CHARACTERS)}
        self.fingerprint = "char:" + hashlib.sha1(CHARACTERS.encode()).hexdigest()[:12]

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as err:
            raise ValueError(f"CharTokenizer encodes printable ASCII and '\\n' only; got {err.args[0]!r} "
                             f"in {text[:60]!r}") from None

    def token(self, character: str) -> int:
        """The id of one character."""
        if len(character) != 1:
            raise ValueError(f"expected one character, got {character!r}")
        return self.encode(character)[0]

    def decode(self, ids: list[int]) -> str:
        """Text up to the first end-of-response; specials are dropped."""
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i >= 3:
                out.append(CHARACTERS[i - 3])
        return "".join(out)


class HFTokenizer:
    """A transformers tokenizer behind the trainer's interface."""

    single_characters = False

    def __init__(self, tokenizer) -> None:
        self.inner = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token; rollouts need one to stop")
        self.eos_id = int(tokenizer.eos_token_id)
        self.bos_id = int(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        self.vocab_size = len(tokenizer)
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        self.fingerprint = "hf:" + hashlib.sha1(repr(vocab).encode()).hexdigest()[:12]

    def encode(self, text: str) -> list[int]:
        return list(self.inner(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.inner.decode(ids, skip_special_tokens=True)


def check_same_vocabulary(student: Tokenizer, expert: Tokenizer, what: str = "expert") -> None:
    """A ValueError unless both tokenizers map text to the same ids."""
    if student.fingerprint != expert.fingerprint or student.vocab_size != expert.vocab_size:
        raise ValueError(
            f"the {what}'s tokenizer ({expert.fingerprint}, {expert.vocab_size} tokens) differs from the student's "
            f"({student.fingerprint}, {student.vocab_size} tokens); a sparse target's ids would name different "
            f"tokens. Use an {what} that shares the student's tokenizer."
        )
