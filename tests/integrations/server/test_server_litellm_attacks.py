"""Attacks on the LiteLLM guardrail endpoint: media LiteLLM sends (or forwards) that the guard never screened.

LiteLLM answers ``NONE`` by forwarding the request as the client sent it, and on
``GUARDRAIL_INTERVENED`` it writes back only changed ``structured_messages`` rows, never the
``images`` list (litellm 1.110, ``generic_guardrail_api.py`` and every ``guardrail_translation``
handler). So every carrier of media must be screened or refused, and a masked image must
have a row to travel in.
"""

from __future__ import annotations

import base64
import io
import os

import httpx
import pytest
from PIL import Image

from server_helpers import ALL_UNSAFE, LITELLM_AS_SENT, NONE_UNSAFE, data_url, make_guard, png_bytes, run_gateway  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:.*ReadOnly.*:UserWarning")  # LiteLLM's own TypedDicts under pydantic

EP = "/beta/litellm_basic_guardrail_api"
UNREADABLE = b"\x89PNG\r\n\x1a\n" + b"\x00" * 80  # a PNG signature and nothing decodable


def unreadable_url() -> str:
    return data_url(UNREADABLE, "image/png")


def ask(gw, body: dict) -> dict:
    body = {"input_type": "request", "request_data": {}, "additional_provider_specific_params": {"guardalign_rows": "as_sent"}, **body}
    response = httpx.post(gw.url + EP, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def user(*parts: dict, **fields) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": "what is this?"}, *parts], **fields}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def is_black(url: str) -> bool:
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    return image.getextrema() == ((0, 0), (0, 0), (0, 0))


@pytest.fixture(scope="module")
def litellm_classes():
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no network: LiteLLM otherwise fetches its price list
    pytest.importorskip("litellm")
    from litellm.exceptions import GuardrailRaisedException
    from litellm.llms.openai.chat.guardrail_translation.handler import OpenAIChatCompletionsHandler
    from litellm.proxy.guardrails.guardrail_hooks.generic_guardrail_api import GenericGuardrailAPI

    return GenericGuardrailAPI, OpenAIChatCompletionsHandler, GuardrailRaisedException


def test_images_list_is_screened_when_the_messages_have_images_of_their_own(make_guard, png_bytes):
    with run_gateway(make_guard(NONE_UNSAFE, action="block")) as gw:
        answer = ask(gw, {"texts": ["what is this?"], "images": [unreadable_url()],
                          "structured_messages": [user(image_part(data_url(png_bytes, "image/png")))]})
        assert answer["action"] == "BLOCKED", answer
        assert "images[0]" in answer["blocked_reason"] and "could not be checked" in answer["blocked_reason"]


def _unscreened_carriers() -> dict[str, dict]:
    garbage = unreadable_url()
    raw = garbage.split(",", 1)[1]
    return {
        "file part": user({"type": "file", "file": {"file_data": garbage, "filename": "x.png"}}),
        "input_image part": user({"type": "input_image", "image_url": garbage}),
        "anthropic image part": user({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": raw}}),
        "message-level images": {"role": "user", "content": "what is this?", "images": [raw]},
    }


@pytest.mark.parametrize("carrier", sorted(_unscreened_carriers()))
def test_media_outside_image_url_parts_is_refused(make_guard, carrier):
    # no image_url part anywhere: the walk must still run over structured_messages
    with run_gateway(make_guard(NONE_UNSAFE)) as gw:
        answer = ask(gw, {"texts": ["what is this?"], "structured_messages": [_unscreened_carriers()[carrier]]})
        assert answer["action"] == "BLOCKED", answer
        assert "refused" in answer["blocked_reason"]
        assert UNREADABLE.hex() not in answer["blocked_reason"]


@pytest.mark.parametrize("field", ["files", "image", "input"])
def test_unknown_top_level_field_with_media_is_refused(make_guard, png_bytes, field):
    with run_gateway(make_guard(NONE_UNSAFE)) as gw:
        answer = ask(gw, {"texts": ["hi"], field: [data_url(png_bytes, "image/png")]})
        assert answer["action"] == "BLOCKED", answer
        assert repr(field) in answer["blocked_reason"]
        # LiteLLM's own fields are not over-refused: long texts, tools, headers, ids pass
        plain = ask(gw, {"texts": ["x" * 5000], "tools": [{"type": "function", "function": {"name": "f"}}],
                         "request_headers": {"user-agent": "u" * 400}, "litellm_call_id": "c", "model": "m",
                         "additional_provider_specific_params": {}, "litellm_version": "1.110"})
        assert plain == {"action": "NONE"}


def test_images_only_that_need_masking_are_blocked_not_passed_as_sent(make_guard, png_bytes):
    # a response check (or any handler without rows) sends images alone; LiteLLM never writes
    # the returned images back, so "intervened" would forward the unmasked original
    with run_gateway(make_guard(ALL_UNSAFE)) as gw:
        for input_type in ("request", "response"):
            answer = ask(gw, {"input_type": input_type, "texts": ["hi"], "images": [data_url(png_bytes, "image/png")]})
            assert answer["action"] == "BLOCKED", answer
            assert "images[0]" in answer["blocked_reason"]
    with run_gateway(make_guard(NONE_UNSAFE)) as gw:  # nothing to change: passes as sent
        assert ask(gw, {"texts": ["hi"], "images": [data_url(png_bytes, "image/png")]}) == {"action": "NONE"}


def test_an_images_entry_missing_from_the_messages_cannot_ride_along_unmasked(make_guard, png_bytes):
    # the messages' own image is masked and written back; a second image only in `images` would
    # be forwarded by LiteLLM as sent, so the whole request is blocked
    other = Image.new("RGB", (64, 64), (200, 30, 30))
    buffer = io.BytesIO()
    other.save(buffer, "PNG")
    inside, outside = data_url(png_bytes, "image/png"), data_url(buffer.getvalue(), "image/png")
    with run_gateway(make_guard(ALL_UNSAFE)) as gw:
        answer = ask(gw, {"texts": ["what is this?"], "images": [inside, outside],
                          "structured_messages": [user(image_part(inside))]})
        assert answer["action"] == "BLOCKED", answer
        assert "images[1]" in answer["blocked_reason"]
        # when the list and the rows agree, every copy comes back masked, in order
        rows = [user(image_part(inside)), {"role": "assistant", "content": "ok"}, user(image_part(inside))]
        agreed = ask(gw, {"texts": ["what is this?"] * 2 + ["ok"], "images": [inside, inside], "structured_messages": rows})
        assert agreed["action"] == "GUARDRAIL_INTERVENED", agreed
        returned = agreed["structured_messages"]
        assert returned[1] == rows[1]  # untouched rows come back equal: LiteLLM keeps its originals
        for row in (returned[0], returned[2]):
            assert is_black(row["content"][1]["image_url"]["url"])
        assert len(agreed["images"]) == 2 and all(is_black(url) for url in agreed["images"])


def test_images_and_messages_share_one_image_budget(make_guard, png_bytes):
    other = Image.new("RGB", (64, 64), (10, 120, 10))
    buffer = io.BytesIO()
    other.save(buffer, "PNG")
    with run_gateway(make_guard(NONE_UNSAFE, limits={"max_images": 1})) as gw:
        answer = ask(gw, {"texts": ["what is this?"], "images": [data_url(buffer.getvalue(), "image/png")],
                          "structured_messages": [user(image_part(data_url(png_bytes, "image/png")))]})
        assert answer["action"] == "BLOCKED", answer


async def test_litellm_chat_handler_does_not_forward_an_image_in_a_file_part(make_guard, png_bytes, litellm_classes):
    # end to end through LiteLLM's classes: a file part carrying an image is not an image_url,
    # so LiteLLM's `images` is empty; answered NONE it would reach the model unscreened
    GenericGuardrailAPI, Handler, GuardrailRaisedException = litellm_classes
    part = {"type": "file", "file": {"file_data": data_url(png_bytes, "image/png"), "filename": "coffee.png"}}
    with run_gateway(make_guard(ALL_UNSAFE)) as gw:
        guardrail = GenericGuardrailAPI(**LITELLM_AS_SENT, api_base=gw.url, guardrail_name="guardalign", event_hook="pre_call")
        data = {"model": "gpt-x", "messages": [user(part)]}
        with pytest.raises(GuardrailRaisedException, match="'file' is not screened"):
            await Handler().process_input_messages(data, guardrail)
        assert gw.forwarded() == []


async def test_litellm_images_only_check_raises_instead_of_passing_the_original(make_guard, png_bytes, litellm_classes):
    # what LiteLLM's response checks and its extraction handler send: texts and images, no rows
    GenericGuardrailAPI, _, GuardrailRaisedException = litellm_classes
    with run_gateway(make_guard(ALL_UNSAFE)) as gw:
        guardrail = GenericGuardrailAPI(**LITELLM_AS_SENT, api_base=gw.url, guardrail_name="guardalign", event_hook="post_call")
        inputs = {"texts": ["here it is"], "images": [data_url(png_bytes, "image/png")]}
        with pytest.raises(GuardrailRaisedException, match="images"):
            await guardrail.apply_guardrail(inputs=inputs, request_data={}, input_type="response")


def test_rows_litellm_may_have_stripped_are_refused_unless_the_config_says_they_are_as_sent(make_guard, png_bytes):
    # LiteLLM's default (forward_messages_as_sent: false) drops keys its chat types do not
    # declare before asking, then forwards the original messages: the guard would see a
    # text-only row while the model gets the image. Without the config's declaration: BLOCKED.
    with run_gateway(make_guard(NONE_UNSAFE)) as gw:
        rows = [user(image_part(data_url(png_bytes, "image/png")))]
        for params in (None, {}, {"guardalign_rows": "stripped"}):
            body = {"texts": ["what is this?"], "structured_messages": rows}
            if params is not None:
                body["additional_provider_specific_params"] = params
            response = httpx.post(gw.url + EP, json={"input_type": "request", **body}, timeout=60).json()
            assert response["action"] == "BLOCKED" and "forward_messages_as_sent: true" in response["blocked_reason"]
        assert ask(gw, {"texts": ["what is this?"], "structured_messages": rows})["action"] == "NONE"
        assert ask(gw, {"texts": ["hi"], "images": []})["action"] == "NONE"  # no rows: nothing to strip


@pytest.mark.parametrize("as_sent", [False, True])
async def test_an_image_url_beside_a_text_part_never_reaches_an_ollama_payload(make_guard, png_bytes, litellm_classes, as_sent):
    # LiteLLM's ollama_chat provider reads part["image_url"] of every part, whatever its type
    from litellm.litellm_core_utils.prompt_templates.common_utils import extract_images_from_message

    GenericGuardrailAPI, Handler, GuardrailRaisedException = litellm_classes
    url = data_url(png_bytes, "image/png")
    data = {"model": "ollama_chat/llava", "messages": [{"role": "user", "content": [{"type": "text", "text": "what?", "image_url": {"url": url}}]}]}
    assert extract_images_from_message(data["messages"][0])  # the attack: the provider would send this image
    settings = LITELLM_AS_SENT if as_sent else {}
    with run_gateway(make_guard(ALL_UNSAFE, action="block")) as gw:
        guardrail = GenericGuardrailAPI(**settings, api_base=gw.url, guardrail_name="guardalign", event_hook="pre_call")
        with pytest.raises(GuardrailRaisedException, match="forward_messages_as_sent" if not as_sent else "text"):
            await Handler().process_input_messages(data, guardrail)
