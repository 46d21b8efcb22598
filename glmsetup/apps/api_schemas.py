"""Request bodies of the API server and how a chat request becomes (query, history).

Both protocols are validated strictly (a string where a number belongs is an error, not a guess; no NaN
or infinity anywhere) and every problem becomes an ApiError: an HTTP status plus an OpenAI-style error
body {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

from typing import Any, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

ROLES = ("system", "user", "assistant")
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256  # each stop sequence is searched for after every token
MAX_REPETITION_PENALTY = 10.0
MIN_REPETITION_PENALTY = 0.5  # the pages' and profiles' floor: below it a penalty rewards repetition wildly


class ApiError(Exception):
    """An error answered to the client: status, message, OpenAI error type, the parameter at fault, a code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- the official protocol: POST / -------------------------------------------------------------------


class OfficialRequest(BaseModel):
    """The body of the official api.py: {prompt, history, max_length?, top_p?, temperature?}."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: StrictStr
    history: Optional[List[Tuple[StrictStr, StrictStr]]] = None
    max_length: Optional[StrictInt] = Field(default=None, gt=0)
    top_p: Optional[StrictFloat] = Field(default=None, ge=0.0, le=1.0)
    temperature: Optional[StrictFloat] = Field(default=None, ge=0.0, le=2.0)


# --- the OpenAI protocol: POST /v1/chat/completions --------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: StrictStr
    content: Union[StrictStr, List[TextPart], None] = None
    name: Optional[StrictStr] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat completion body; fields this model cannot honour are refused, others ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Optional[StrictStr] = None
    messages: List[ChatMessage] = Field(min_length=1)
    temperature: Optional[StrictFloat] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[StrictFloat] = Field(default=None, ge=0.0, le=1.0)
    max_tokens: Optional[StrictInt] = Field(default=None, gt=0)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, gt=0)
    max_length: Optional[StrictInt] = Field(default=None, gt=0)
    repetition_penalty: Optional[StrictFloat] = Field(default=None, ge=MIN_REPETITION_PENALTY,
                                                      le=MAX_REPETITION_PENALTY)
    n: Optional[StrictInt] = Field(default=None, ge=1)
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[StrictStr, List[StrictStr], None] = None
    user: Optional[StrictStr] = None

    def new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def stop_strings(self) -> List[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ApiError(400, f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences", param="stop")
        for i, stop in enumerate(stops):
            if len(stop) > MAX_STOP_CHARS:
                where = "stop" if isinstance(self.stop, str) else f"stop[{i}]"
                raise ApiError(400, f"'{where}' is {len(stop)} characters long; a stop sequence may have at most "
                                    f"{MAX_STOP_CHARS}", param=where)
        return [s for s in stops if s]


def to_query_history(messages: List[ChatMessage]) -> Tuple[str, List[Tuple[str, str]]]:
    """Turn OpenAI messages into ChatGLM2's (query, history) by the rules of the official openai_api.py.

    The last message (from the user) is the query; a system message that comes first is put in front
    of it, with nothing between. The messages in between become history only when they are an even
    number, taken as (user, assistant) pairs; other pairs are left out. So a system message that is
    not first, consecutive user messages or a conversation the assistant opened drop out of the prompt,
    as on the official server. These are the rules of a converted folder's chat template too
    (runtime/engine_files.py): the same messages make the same prompt here and on an engine serving
    that folder.
    """
    from glmsetup.runtime.engine_files import official_query_history

    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise ApiError(400, f"messages[{i}].role is {message.role!r}; this server knows the roles "
                                f"{', '.join(ROLES)}", param=f"messages[{i}].role", code="invalid_role")
    if messages[-1].role != "user":
        raise ApiError(400, f"the last message must come from the user, not from the {messages[-1].role}",
                       param=f"messages[{len(messages) - 1}].role", code="invalid_last_message")
    return official_query_history([{"role": m.role, "content": m.text()} for m in messages])


def describe_validation_error(errors: List[dict]) -> Tuple[str, Optional[str]]:
    """One clear sentence (and the parameter) for pydantic/FastAPI validation errors."""
    if not errors:
        return "the request body is not valid", None
    err = errors[0]
    loc = [part for part in err.get("loc", ()) if part != "body"]
    param = _format_loc(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON ({detail})" if detail else "the request body is not valid JSON", None
    if kind == "missing" and not loc:
        return "the request needs a JSON body", None
    if kind == "missing":
        return f"'{param}' is required", param
    if kind == "model_attributes_type" or (kind.endswith("_type") and not loc):
        return "the request body must be a JSON object", None
    got = err.get("input")
    msg = err.get("msg", "is not valid")
    shown = _short(got)
    return f"'{param}': {msg[0].lower() + msg[1:] if msg else msg}" + (f" (got {shown})" if shown else ""), param


def _format_loc(loc: List[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[TextPart]", "none", "function-after"):
            continue  # union branch names: not a place in the body
        else:
            out += ("." if out else "") + str(part)
    return out


def _short(value: Any) -> str:
    if value is None or isinstance(value, (dict, list)):
        return ""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
