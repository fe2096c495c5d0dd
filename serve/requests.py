"""Request bodies as Pydantic models, and the one reading of a validation error in the wire format
(`{"error": {"message", "type", "field"}}`, see `describe`).

The limits come from `serve.*` (`max_top_k`, `max_new_tokens`, `max_batch`, `max_upload_bytes`), so the models are
made per app from its config (`request_models`). Unknown top-level fields are ignored (OpenAI clients send `model`,
`user`, ...); a new song's unknown fields are refused by `SongInputs.new_song`, which checks and sanitises its
metadata. Ids (`user_id`, `song_id`, `history` entries) are not typed here: looking them up is the check, and an
unknown id is a 404 that names it. JSON is parsed by Pydantic, whose parser refuses deep nesting (a 400, not a
RecursionError).
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from llmrec.config import ServeConfig

# error type -> HTTP status (every other validation error is a 422)
STATUS = {"json_invalid": 400, "upload_too_large": 413}
# union members are told apart by these tags, which Pydantic puts into an error's location: not field names
ONE, MANY, SONG_ID, NEW_SONG = "one", "many", "song id", "new song"
EMBED_INPUT = "expected a song id, a new song object, or a non-empty list of them"


def says(text: str):
    """Any way the field itself fails (wrong type, out of range, empty) reads `text`, where `{got}` is the value
    given; a failure inside it (a field of a new song) keeps its own message."""

    def check(value, handler):
        try:
            return handler(value)
        except ValidationError as e:
            if any(err["loc"] for err in e.errors()):
                raise
            raise PydanticCustomError("invalid_value", text, {"got": repr(value)}) from None

    return WrapValidator(check)


def int_in(lo: int, hi: int):
    return Annotated[StrictInt, Field(ge=lo, le=hi), says(f"expected an integer in [{lo}, {hi}], got {{got}}")]


Flag = Annotated[StrictBool, says("expected true or false, got {got}")]


def at_most(n: int, setting: str):
    def check(items: list) -> list:
        if len(items) > n:
            raise PydanticCustomError("too_long", "{count} items; at most {n} per request ({setting})",
                                      {"count": len(items), "n": n, "setting": setting})
        return items

    return AfterValidator(check)


def upload(limit: int):
    """Base64 text (or a `data:` URL) -> bytes, at most `limit` of them (serve.max_upload_bytes)."""

    def decode(value: str) -> bytes:
        too_big = PydanticCustomError("upload_too_large", "upload over {limit} bytes (serve.max_upload_bytes)",
                                      {"limit": limit})
        if len(value) > limit * 4 // 3 + 8:  # refused before decoding
            raise too_big
        try:
            data = base64.b64decode(value.split(",", 1)[-1] if value.startswith("data:") else value, validate=True)
        except (binascii.Error, ValueError):
            raise PydanticCustomError("invalid_value", "not valid base64") from None
        if len(data) > limit:
            raise too_big
        return data

    return Annotated[StrictStr, says("expected base64 text"), AfterValidator(decode)]


def song_item_kind(value: Any) -> str | None:
    return SONG_ID if isinstance(value, str) else NEW_SONG if isinstance(value, dict) else None


def one_or_many(value: Any) -> str | None:
    return MANY if isinstance(value, list) else None if value is None else ONE


@dataclass(frozen=True)
class RequestModels:
    embeddings: type[BaseModel]
    recommendations: type[BaseModel]
    explanations: type[BaseModel]
    new_song: type[BaseModel]


def request_models(s: ServeConfig) -> RequestModels:
    ignore_unknown = ConfigDict(extra="ignore")

    class NewSongBody(BaseModel):
        """A new song: its uploads here, its metadata in `model_extra` (checked by `SongInputs.new_song`)."""
        model_config = ConfigDict(extra="allow")
        audio: upload(s.max_upload_bytes) | None = None
        cover: upload(s.max_upload_bytes) | None = None
        # any JSON value: `resolve_media_path` checks it (403 first where the server takes no paths at all)
        audio_path: Any = None
        cover_path: Any = None

    item = Annotated[Union[Annotated[StrictStr, Tag(SONG_ID)], Annotated[NewSongBody, Tag(NEW_SONG)]],
                     Discriminator(song_item_kind, custom_error_type="invalid_value",
                                   custom_error_message="expected a song id (string) or a new song (object)")]
    items = Annotated[list[item], Field(min_length=1), says(EMBED_INPUT), at_most(s.max_batch, "serve.max_batch")]

    class Embeddings(BaseModel):
        model_config = ignore_unknown
        input: Annotated[Union[Annotated[item, Tag(ONE)], Annotated[items, Tag(MANY)]],
                         Discriminator(one_or_many, custom_error_type="invalid_value",
                                       custom_error_message=EMBED_INPUT)] = Field(None, validate_default=True)
        encoding_format: Annotated[Literal["float", "base64"], says("expected 'float' or 'base64'")] = "float"
        neighbours: int_in(0, s.max_top_k) = 0
        add_to_index: Flag = False

    class ForUser(BaseModel):
        """`user_id` or `history` (exactly one, see `fields_set`)."""
        model_config = ignore_unknown
        user_id: Any = None
        history: Annotated[list[Any], Field(min_length=1), says("expected a non-empty list of song ids (most recent "
                                                                "first)"),
                           at_most(s.max_batch, "serve.max_batch")] = None
        max_new_tokens: int_in(1, s.max_new_tokens) = s.max_new_tokens
        evidence: Flag = False

    class Recommendations(ForUser):
        k: int_in(1, s.max_top_k) = 10
        exclude_seen: Flag = True
        reasons: Flag = True

    class Explanations(ForUser):
        song_id: Any = None

    return RequestModels(Embeddings, Recommendations, Explanations, NewSongBody)


def field_name(loc: tuple) -> str:
    """('input', 0, 'audio') -> 'input[0].audio' (union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in (ONE, MANY, SONG_ID, NEW_SONG):
            out += f".{part}" if out else part
    return out


def describe(exc: ValidationError) -> tuple[int, str, str]:
    """(status, field, message) for the first error, as the wire format carries it."""
    err = exc.errors(include_url=False, include_input=False)[0]
    kind, field = err["type"], field_name(err["loc"]) or "body"
    if kind == "json_invalid":
        why = err["ctx"]["error"]
        message = "JSON nested too deeply" if "recursion limit" in why else f"malformed JSON ({why})"
    elif kind == "model_type" and field == "body":
        message = "expected a JSON object"
    else:
        message = err["msg"]
    return STATUS.get(kind, 422), field, f"{field}: {message}"
