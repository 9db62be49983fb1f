"""Thin adapters that put GuardAlign into LangChain and LlamaIndex pipelines.

Import the framework you use: ``guardalign_integrations.langchain`` (extra ``langchain``)
or ``guardalign_integrations.llama_index`` (extra ``llamaindex``). This package itself
imports neither.
"""

__all__: list[str] = []
