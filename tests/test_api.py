"""The HTTP API in process (utils/api_app.py through starlette's TestClient): auth, limits,
malformed bodies, response shapes of /api/chat and the OpenAI-compatible endpoints."""
import json

import pytest
from fastapi.testclient import TestClient

from config import InferConfig
from model.infer import ChatBot
from utils.api_app import create_app

KEY = "s3cret-key"
MAX_NEW = 6
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def bot(chatty_model_dir):
    return ChatBot(InferConfig(model_dir=str(chatty_model_dir), max_seq_len=MAX_NEW))


@pytest.fixture(scope="module")
def client(bot):
    config = InferConfig(model_dir=bot.config.model_dir, max_seq_len=MAX_NEW, api_key=KEY, max_input_chars=50,
                         max_new_tokens_cap=32, max_body_bytes=4096)
    with TestClient(create_app(config, bot)) as c:
        yield c


def completion(client, content="你好", headers=AUTH, **extra):
    return client.post("/v1/chat/completions", headers=headers,
                       json={"model": "x", "messages": [{"role": "user", "content": content}], **extra})


def sse_events(text: str) -> list:
    """The `data:` payloads of an SSE body; [DONE] kept as a string."""
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- the original endpoint ------------------------------------------------------------------
def test_api_chat_answers_like_the_original(client, bot):
    r = client.post("/api/chat", headers=AUTH, json={"input_txt": "感冒了要怎么办"})
    assert r.status_code == 200
    assert r.json() == {"response": bot.chat("感冒了要怎么办")}


@pytest.mark.parametrize("text", ["", "   "])
def test_api_chat_empty_input_is_refused(client, text):
    r = client.post("/api/chat", headers=AUTH, json={"input_txt": text})
    assert r.status_code == 406
    assert "input_txt must not be empty" in r.json()["detail"]


# ---- auth -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,path,body", [
    ("post", "/api/chat", {"input_txt": "你好"}),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 2}),
    ("get", "/v1/models", None),
])
def test_api_key_none_wrong_right(client, method, path, body):
    kwargs = {"json": body} if body is not None else {}
    none = getattr(client, method)(path, **kwargs)
    assert none.status_code == 401 and none.headers["www-authenticate"] == "Bearer"
    assert "missing API key" in none.text
    for bad in ("Bearer wrong", f"Bearer {KEY}x", f"Basic {KEY}", KEY):
        wrong = getattr(client, method)(path, headers={"Authorization": bad}, **kwargs)
        assert wrong.status_code == 401, bad
    right = getattr(client, method)(path, headers=AUTH, **kwargs)
    assert right.status_code == 200
    if path.startswith("/v1/"):
        assert none.json()["error"]["type"] == "authentication_error"


def test_auth_is_checked_before_the_body_is_parsed(client):
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 401


def test_health_and_page_need_no_key(client):
    health = client.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body == {"status": "ok", "model": "chatlm-mini-chinese", "device": "cpu", "dtype": "float32"}
    # the load counters only for holders of the key
    assert client.get("/health", headers={"Authorization": "Bearer wrong"}).json() == body
    full = client.get("/health", headers=AUTH).json()
    assert isinstance(full["tokens_generated"], int) and full["active_requests"] == 0
    for path in ("/", "/health"):
        head = client.head(path)
        assert head.status_code == 200 and head.content == b"", path
    assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/chat.js">' in page.text
    js = client.get("/static/chat.js")
    assert js.status_code == 200 and "/v1/chat/completions" in js.text


# ---- OpenAI-compatible ----------------------------------------------------------------------
def test_models_lists_the_served_model(client):
    body = client.get("/v1/models", headers=AUTH).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["chatlm-mini-chinese"]


def test_chat_completion_object(client, bot):
    r = completion(client, "你好", max_tokens=5)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == bot.chat("你好", max_new_tokens=5)
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 5 and usage["prompt_tokens"] == 3  # 你, 好, [EOS]
    assert usage["total_tokens"] == 8


def test_last_user_message_is_the_question(client, bot):
    r = client.post("/v1/chat/completions", headers=AUTH, json={"max_tokens": 4, "messages": [
        {"role": "system", "content": "你是助手"}, {"role": "user", "content": "早上好"},
        {"role": "assistant", "content": "早"}, {"role": "user", "content": [{"type": "text", "text": "你好"}]}]})
    assert r.json()["choices"][0]["message"]["content"] == bot.chat("你好", max_new_tokens=4)


def test_streamed_chat_completion_chunks(client, bot):
    with client.stream("POST", "/v1/chat/completions", headers=AUTH, json={
            "messages": [{"role": "user", "content": "你好"}], "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    contents = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert sum(1 for x in contents if x) == 5  # one chunk per generated character
    assert "".join(contents) == bot.chat("你好", max_new_tokens=5)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_temperature_samples(client):
    r = completion(client, "你好", max_tokens=4, temperature=1.0, top_p=0.9)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


# ---- limits -----------------------------------------------------------------------------------
def test_input_length_limit(client):
    r = client.post("/api/chat", headers=AUTH, json={"input_txt": "问" * 51})
    assert r.status_code == 400 and "limit is 50" in r.json()["detail"]
    r = completion(client, "问" * 51)
    assert r.status_code == 400 and "limit is 50" in r.json()["error"]["message"]
    assert completion(client, "问" * 50, max_tokens=1).status_code == 200


def test_max_tokens_limit(client):
    r = completion(client, max_tokens=33)
    assert r.status_code == 400 and "max_tokens is 33; the limit is 32" in r.json()["error"]["message"]
    assert completion(client, max_completion_tokens=33).status_code == 400
    assert completion(client, max_tokens=0).status_code == 400


def test_body_size_limit(client):
    big = json.dumps({"input_txt": "a" * 5000}).encode()
    r = client.post("/api/chat", headers={**AUTH, "Content-Type": "application/json"}, content=big)
    assert r.status_code == 413 and "limit is 4096 bytes" in r.json()["detail"]

    def chunked():  # no Content-Length: the limit must hold while the body streams in
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    r = client.post("/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, content=chunked())
    assert r.status_code == 413 and "limit is 4096 bytes" in r.json()["error"]["message"]


def test_tiny_temperature_gives_the_greedy_answer(client, bot):
    r = completion(client, "你好", max_tokens=5, temperature=1e-40)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == bot.chat("你好", max_new_tokens=5)


# ---- malformed bodies: 4xx with a message, never 500 ----------------------------------------
@pytest.mark.parametrize("path,body", [
    ("/api/chat", b"{\"input_txt\": "),
    ("/api/chat", b"not json at all"),
    ("/api/chat", b"[\"input_txt\"]"),
    ("/api/chat", b"{\"input_txt\": 5}"),
    ("/api/chat", b"{\"input_txt\": null}"),
    ("/api/chat", b"{}"),
    ("/api/chat", b"\xff\xfe\x00garbage"),
    ("/api/chat", b"[" * 3000),
    ("/api/chat", b""),
    ("/v1/chat/completions", b"{\"messages\": []}"),
    ("/v1/chat/completions", b"{\"messages\": \"hi\"}"),
    ("/v1/chat/completions", b"{\"messages\": [{\"role\": \"alien\", \"content\": \"hi\"}]}"),
    ("/v1/chat/completions", b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"temperature\": 5}"),
    ("/v1/chat/completions", b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": \"many\"}"),
    ("/v1/chat/completions", b"{\"messages\": [{\"role\": \"user\""),
    ("/v1/chat/completions", b"[" * 3000),  # FastAPI's parser gives up: was 422, not OpenAI's 400
])
def test_malformed_bodies_get_4xx(client, path, body):
    """/api/chat: FastAPI's 422; /v1: OpenAI's 400 invalid_request_error."""
    r = client.post(path, headers={**AUTH, "Content-Type": "application/json"}, content=body)
    if path.startswith("/v1/"):
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
        message = r.json()["error"]["message"]
    else:
        assert r.status_code == 422, r.text
        message = r.json()["detail"]
    assert message.startswith("invalid request body")


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_body_that_is_not_utf8_is_said_to_be_so(client, path):
    """A GBK body was answered "it could not be parsed as JSON", which hides the cause."""
    body = '{"input_txt": "你好", "messages": [{"role": "user", "content": "你好"}]}'.encode("gbk")
    r = client.post(path, headers={**AUTH, "Content-Type": "application/json"}, content=body)
    assert r.status_code == (400 if path.startswith("/v1/") else 422), r.text
    message = r.json()["error"]["message"] if path.startswith("/v1/") else r.json()["detail"]
    assert message == ("invalid request body: it is not UTF-8 (byte 0xc4 at byte offset 15); "
                       "send JSON as UTF-8"), message


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("media_type", ["application/x-www-form-urlencoded", "text/plain"])
def test_json_sent_without_a_json_content_type_is_told_which_header_to_send(client, path, media_type):
    """`curl -d '{...}'` without -H sends a form: FastAPI does not read it as JSON (rightly), and
    the answer was "body: Input should be a valid dictionary or object to extract fields from"."""
    body = json.dumps({"input_txt": "你好", "messages": [{"role": "user", "content": "你好"}]}).encode()
    r = client.post(path, headers={**AUTH, "Content-Type": media_type}, content=body)
    assert r.status_code == (400 if path.startswith("/v1/") else 422), r.text
    message = r.json()["error"]["message"] if path.startswith("/v1/") else r.json()["detail"]
    assert message == (f"invalid request body: it was sent as {media_type}; send JSON with the header "
                       "Content-Type: application/json"), message


@pytest.mark.parametrize("extra,field", [
    ({"max_tokens": "2"}, "max_tokens"), ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 2.0}, "max_tokens"),
    ({"stream": "yes"}, "stream"), ({"stream": 1}, "stream"), ({"temperature": "0.5"}, "temperature"),
    ({"n": "1"}, "n"),
])
def test_lax_coercions_are_refused_like_openai(client, extra, field):
    r = completion(client, "你好", **extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and f"invalid request body: {field}:" in error["message"]


def test_integral_number_is_a_float(client):
    assert completion(client, "你好", max_tokens=2, temperature=1, top_p=1).status_code == 200


SURROGATE = b'"\\ud800abc"'  # JSON text for a string holding a lone surrogate


@pytest.mark.parametrize("path,body", [
    ("/api/chat", b'{"input_txt": ' + SURROGATE + b'}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ' + SURROGATE + b'}]}'),
    ("/v1/chat/completions", b'{"stream": true, "messages": [{"role": "user", "content": ' + SURROGATE + b'}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": ' + SURROGATE
     + b'}]}]}'),
])
def test_lone_surrogate_is_a_clear_4xx(client, path, body):
    r = client.post(path, headers={**AUTH, "Content-Type": "application/json"}, content=body)
    assert r.status_code in (400, 422), r.text
    assert not r.headers["content-type"].startswith("text/event-stream")
    message = r.json()["error"]["message"] if path.startswith("/v1/") else r.json()["detail"]
    assert "unpaired surrogate (U+D800) at character 0" in message, message


def test_internal_errors_never_reach_the_client(client, bot, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(bot, "_generate_batch", broken)
    client = TestClient(client.app, raise_server_exceptions=False)  # answer as a server would
    for r in (client.post("/api/chat", headers=AUTH, json={"input_txt": "你好"}), completion(client, "你好")):
        assert r.status_code == 500
        assert "secret" not in r.text and "internal error" in r.text
    assert completion(client, "你好").json()["error"]["type"] == "server_error"
    with client.stream("POST", "/v1/chat/completions", headers=AUTH, json={
            "messages": [{"role": "user", "content": "你好"}], "stream": True}) as r:
        text = r.read().decode()
    events = sse_events(text)
    assert events[-2]["error"]["type"] == "server_error" and events[-1] == "[DONE]"
    assert "secret" not in text and "internal error" in text


def test_wrong_method_under_v1_is_an_invalid_request(client):
    r = client.get("/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("messages,expected", [
    ([{"role": "system", "content": "你是助手"}], "must contain a user message"),
    ([{"role": "user", "content": "  "}], "last user message is empty"),
])
def test_unanswerable_conversations_get_400(client, messages, expected):
    r = client.post("/v1/chat/completions", headers=AUTH, json={"messages": messages})
    assert r.status_code == 400 and expected in r.json()["error"]["message"]


def test_only_one_choice(client):
    assert completion(client, n=2).status_code == 400


def test_unknown_v1_path_uses_openai_error_shape(client):
    r = client.get("/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and "message" in r.json()["error"]


# ---- settings for `uvicorn api_demo:app`, and the key's sources --------------------------------
def test_settings_from_environment(tmp_path):
    from utils.api_app import config_from_env, resolve_api_key
    from utils.cli import UserError

    config = config_from_env({"CHATLM_MODEL_DIR": str(tmp_path), "CHATLM_MAX_SEQ_LEN": "7",
                              "CHATLM_BATCH_WAIT_MS": "5", "CHATLM_API_KEY": "ignored-here"})
    assert (config.model_dir, config.max_seq_len, config.batch_wait_ms, config.api_key) == (str(tmp_path), 7, 5.0, "")
    with pytest.raises(UserError, match=r"^bad environment variable CHATLM_MAX_SEQ_LEN='abc': invalid int value"):
        config_from_env({"CHATLM_MAX_SEQ_LEN": "abc"})
    assert resolve_api_key(InferConfig(), {"CHATLM_API_KEY": "from-env"}).api_key == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert resolve_api_key(InferConfig(api_key_file=str(key_file)), {}).api_key == "from-file"
    with pytest.raises(UserError, match="given twice"):
        resolve_api_key(InferConfig(api_key_file=str(key_file)), {"CHATLM_API_KEY": "x"})
    key_file.write_text("  \n")
    with pytest.raises(UserError, match="is empty"):
        resolve_api_key(InferConfig(api_key_file=str(key_file)), {})


# ---- stop sequences and the options this model cannot honour -----------------------------------
def test_stop_at_cuts_before_the_first_sequence_also_across_pieces():
    from utils.api_app import StopAt

    stop = StopAt(["好吗？", "再见"])
    sent = [stop.feed(p) for p in ["你", "好", "吗", "？再见", "不送"]]
    assert "".join(sent) == "你" and stop.hit and stop.flush() == ""
    assert sent == ["", "", "你", "", ""]  # the last longest-1 = 2 characters wait for the next piece
    none = StopAt("X")  # a single sequence as a plain string
    assert none.feed("ab") == "ab" and not none.hit and none.flush() == ""
    held = StopAt("abc")
    assert held.feed("xxab") == "xx" and held.flush() == "ab" and not held.hit
    earliest = StopAt(["cd", "b"])
    assert earliest.feed("abcd") == "a"
    assert StopAt(None).feed("abc") == "abc"


def test_stop_cuts_the_answer_streamed_or_not(client, bot):
    whole = bot.chat("你好", max_new_tokens=6)
    seq = whole[3:5]
    expected = whole[:whole.find(seq)]
    r = completion(client, "你好", max_tokens=6, stop=[seq])
    choice = r.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (expected, "stop")
    assert completion(client, "你好", max_tokens=6, stop="不会出现的句子").json()["choices"][0]["message"]["content"] == whole
    with client.stream("POST", "/v1/chat/completions", headers=AUTH, json={
            "messages": [{"role": "user", "content": "你好"}], "max_tokens": 6, "stream": True, "stop": seq}) as r:
        chunks = sse_events(r.read().decode())[:-1]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("extra, expected", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools are not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format 'json_object' is not supported"),
    ({"logprobs": True}, "logprobs are not supported"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop has 5 sequences; at most 4"),
    ({"stop": [""]}, "stop"),
])
def test_options_that_would_change_the_answer_unhonoured_are_refused(client, extra, expected):
    """Ignored, they would silently give another answer than the one asked for."""
    r = completion(client, **extra)
    assert r.status_code == 400 and expected in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("extra", [{"tools": None}, {"tools": []}, {"response_format": {"type": "text"}},
                                   {"logprobs": False}, {"stop": None}, {"user": "u1", "seed": 3}])
def test_their_defaults_are_accepted(client, extra):
    assert completion(client, max_tokens=2, **extra).status_code == 200


def test_serve_names_a_taken_port_or_a_bad_host_before_loading_the_model(tmp_path, capsys):
    """uvicorn found these only after the model had loaded, and exited 3 after "serving ... at";
    the model directory here does not exist: the address is checked first."""
    import socket

    from utils.api_app import serve
    from utils.cli import UserError

    no_model = str(tmp_path / "no_model")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"^cannot listen on 127.0.0.1:{port}: .*; choose another --port"):
            serve(InferConfig(model_dir=no_model, port=port))
    with pytest.raises(UserError, match=r"^--host '999\.1\.1\.1' does not resolve"):
        serve(InferConfig(model_dir=no_model, host="999.1.1.1"))
    # and no warning about serving without a key on a host it cannot serve on
    assert "warning" not in capsys.readouterr().err
