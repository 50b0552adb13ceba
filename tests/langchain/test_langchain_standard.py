"""langchain-tests' standard suites against the real ChatXGenMM on a tiny random checkpoint.

Capability flags are honest: images (data URLs, v1 base64, URLs), image tool messages, Anthropic-style inputs,
tool calling + tool choice, structured output, JSON mode and usage metadata (with prefix-cache reads) are all on.
The image downloads of the suite are served from a local PNG (see conftest). Only tests that need a competent model
(one that reads the question) are xfailed, each with its reason; with real weights they are expected to pass.
"""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_xgenmm import ChatXGenMM

from tests.langchain.helpers import model_params

RANDOM_MODEL = "needs a competent model: a random-weight checkpoint cannot read the question"


class TestChatXGenMMUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatXGenMM]:
        return ChatXGenMM

    @property
    def chat_model_params(self) -> dict:
        # No weights load in __init__: a path that does not exist is fine for construction-only unit tests.
        return {"model": "/nonexistent/xgenmm-checkpoint", "device": "cpu", "dtype": "float32"}

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def supports_image_urls(self) -> bool:
        return True

    @property
    def supports_image_tool_message(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False


class TestChatXGenMMIntegration(ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _offline_image(self, offline_standard_image):
        return offline_standard_image

    @property
    def chat_model_class(self) -> type[ChatXGenMM]:
        return ChatXGenMM

    @property
    def chat_model_params(self) -> dict:
        # Remote images on, so the suite's URL form reaches the (locally served) fetcher under the real policy.
        return model_params(allow_remote_images=True)

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def supports_image_urls(self) -> bool:
        return True

    @property
    def supports_image_tool_message(self) -> bool:
        return True

    @property
    def supports_anthropic_inputs(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        llm = ChatXGenMM(**model_params(max_tokens=4))
        prompt = "Prefix caching: the second request with this long prompt reads its blocks from the cache. " * 4
        llm.invoke(prompt)  # warm the prefix cache
        if stream:
            full = None
            for chunk in llm.stream(prompt):
                full = chunk if full is None else full + chunk
            assert full.usage_metadata["input_token_details"]["cache_read"] > 0
            return full
        message = llm.invoke(prompt)
        assert message.usage_metadata["input_token_details"]["cache_read"] > 0
        return message

    @pytest.mark.xfail(reason=RANDOM_MODEL + " (asserts the call's argument is exactly input=3)")
    def test_tool_calling(self, model) -> None:
        super().test_tool_calling(model)

    @pytest.mark.xfail(reason=RANDOM_MODEL + " (asserts the call's argument is exactly input=3)")
    async def test_tool_calling_async(self, model) -> None:
        await super().test_tool_calling_async(model)

    @pytest.mark.xfail(reason=RANDOM_MODEL + " (with tool_choice=None it must decide by itself to call get_weather)")
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason=RANDOM_MODEL + " (must decide to call the tool and copy the Chinese name into it)")
    def test_unicode_tool_call_integration(self, model, *, tool_choice=None, force_tool_call=True) -> None:
        super().test_unicode_tool_call_integration(model, tool_choice=tool_choice, force_tool_call=force_tool_call)
