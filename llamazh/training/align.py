"""``align_embeddings``: teach the rows a vocabulary extension added to reproduce the base model,
with the transformer body frozen.

The extended tokenizer encodes a text into fewer, longer tokens than the base tokenizer; for
the extensions llamazh makes (``extend_bpe``, ``merge_sentencepiece``) every boundary between
extended tokens is also a boundary between base tokens. So the base model, reading the same
text in its own tokens, says what the extended model should compute at each extended token:

* **output rows** (lm_head, untied): from counts (:func:`llamazh.training.share_output_rows`:
  the first piece's row plus the token's log share of that piece's starts in ``texts``; old
  rows that begin new tokens lowered by their own share), and by default left there: fitting
  them by gradient to the base's final states (``output_lr > 0``: at the base position just
  before a new token, the softmax over ``[old rows; new rows] @ h`` should predict the next
  extended token, as ALM, arXiv:2503.20083, matches chunk likelihoods) made held-out text
  worse on SmolLM2;
* **input rows**: the extended model reads the extended tokens through its first
  ``input_layer`` layers (the rest of the body is not run); the residual stream there, each
  dimension scaled by its spread, should equal the base's at the last piece of each token
  (Token Distillation, arXiv:2505.20133, matches the last layer; matching an early layer
  costs ``input_layer / num_layers`` of it).

Only the new rows train: gradient and optimizer memory scale with the new rows; the base is
run without gradients; teacher states are kept for reuse (a pass over ``texts`` is run once,
later steps revisit it). Tied models train the one shared row with both losses.

Work is counted in process CPU seconds (``time.process_time``), so a budget means the same
compute on a busy machine; evaluation (``eval_texts``) is not counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from llamazh._checks import check_choice, check_positive_float, check_positive_int, check_texts
from llamazh.evaluation import bits_per_char, document_boundary
from llamazh.training._align_checks import _check_models
from llamazh.training._align_losses import _input_loss, _lm_losses, _output_loss
from llamazh.training._align_report import AlignmentReport
from llamazh.training._align_teacher import (
    _Chunk,
    _chunks,
    _decoder_layers,
    _piece_states,
    _split_long,
    _teacher,
)
from llamazh.training.output_share import byte_ends_fn, share_rows

# align_embeddings looks the private helpers up in this module's namespace, where they are
# imported: tests/training/test_align.py patches ``_input_loss`` and ``_lm_losses`` here

__all__ = ["ALIGN_OBJECTIVES", "AlignmentReport", "align_embeddings"]

#: ``objective`` values of :func:`align_embeddings`.
ALIGN_OBJECTIVES = ("lm", "hidden")


def align_embeddings(
    model: nn.Module,
    base_model: nn.Module,
    old_tokenizer: Any,
    new_tokenizer: Any,
    texts: Sequence[str],
    *,
    max_cpu_s: float | None = None,
    max_steps: int | None = None,
    eval_texts: Sequence[str] | None = None,
    eval_every_s: float | None = None,
    input_layer: int = 2,
    lr: float = 3e-3,
    output_lr: float | None = None,
    chunk_tokens: int = 1024,
    max_length: int = 512,
    output_batch: int = 2048,
    output_every: int = 4,
    boundary: int | str | None = "auto",
    progress: bool = False,
    seed: int = 0,
    objective: str = "hidden",
    hidden_weight: float = 1.0,
    shared_map: bool = True,
    output_share: bool = True,
) -> AlignmentReport:
    """Train only ``model``'s new embedding/lm_head rows so that it reproduces ``base_model``.

    ``model`` is ``base_model`` resized to ``new_tokenizer`` (:func:`resize_embeddings`, e.g.
    with ``untie=True``); ``base_model`` is the original, read-only. Steps alternate a teacher
    pass (the base reads a chunk of ``texts`` in its own tokens), an input step (the new input
    rows, through the first ``input_layer`` layers) and an output step (the new lm_head rows,
    on all teacher states kept so far). When ``texts`` are used up, steps revisit them.
    Rows are written into ``model`` only after a completed step, so an interruption
    (``KeyboardInterrupt`` included) leaves ``model`` as it was or as a completed step left it.

    Args:
        model: the resized causal LM (``get_input_embeddings``/``get_output_embeddings``, a
            decoder with ``.layers``); trained in place, its other weights untouched.
        base_model: the model before resizing, with ``len(old_tokenizer)`` rows.
        old_tokenizer, new_tokenizer: Hugging Face tokenizers; ``new`` extends ``old``.
        texts: training text (strings); the more distinct new tokens they hold, the more rows
            learn (rows of tokens that never occur keep their initial values, see the module
            docstring).
        max_cpu_s: budget in process CPU seconds (> 0), checked between steps.
        max_steps: budget in steps (>= 1). Without either budget: two passes over ``texts``.
        eval_texts: texts for the bits-per-character curve (``llamazh.evaluation``).
        eval_every_s: evaluate every this many alignment CPU seconds (default: start and end).
        input_layer: depth at which input rows are matched (1 .. number of layers).
        lr: Adam learning rate of the input rows (and of the shared rows of a tied model).
        output_lr: step of the untied output rows, in nats of logit per occurrence (plain
            SGD on the summed loss, learning rate ``output_lr / mean |h|^2``); 0: no output
            step. Default: 0 with ``output_share`` (fitting the rows to the base's states
            after it made held-out text worse at every rate tried, see
            ``docs/tokenizer.md``), else 0.5.
        chunk_tokens: base tokens per teacher pass.
        max_length: a text of more base tokens is split into consecutive pieces that fit (at
            a line or sentence end where one is near), each read from a document boundary.
        output_batch: teacher positions per output step.
        output_every: the base runs to the end (final states and logits, the output targets)
            on every this many teacher passes, the first included; on the others it stops
            after ``input_layer`` layers (input targets only), which is several times cheaper.
        boundary: ids put before each text (``llamazh.evaluation.document_boundary``).
        progress: print a line per step.
        objective: ``"hidden"`` (default): input rows match the base's hidden states after
            ``input_layer`` layers (the body runs that deep), output rows fit the base's final
            states; ``"lm"``: the extended model runs in full and its next-token loss (plus
            ``hidden_weight`` times the hidden-state mismatch) trains both, several times
            dearer per token (measured in ``benchmarks/vocab_transfer.py``).
        hidden_weight: weight of the hidden-state mismatch in the ``"lm"`` objective.
        shared_map: input rows also get ``M @ s_t``, where ``s_t`` is the base's state after
            reading the token's pieces alone and ``M`` (D, D) one matrix trained for all new
            tokens (untied models; a tied row must also serve as output row).
        output_share: untied models: the output rows start from
            :func:`llamazh.training.share_output_rows` on ``texts`` (the first piece's row
            plus the token's log share of that piece's starts; old rows that begin new tokens
            lowered by their own share), computed once, before the first step, inside the
            budget; the old rows it lowers are written with the first completed step.
        seed: for the order of positions in output steps.

    Returns:
        An :class:`AlignmentReport` (``print(report)`` shows the curve).

    Raises:
        ValueError: ``new_tokenizer`` does not extend ``old_tokenizer``; the models' rows do
            not match the tokenizers; ``texts`` empty or without any new token; a budget that
            cannot run one step (``max_cpu_s`` spent before the first step completed: the
            model is left as it was).
        TypeError: ``texts`` is a string.

    Example:
        >>> model = copy.deepcopy(base)
        >>> resize_embeddings(model, old_tok, new_tok, untie=True)
        >>> report = align_embeddings(model, base, old_tok, new_tok, zh_lines, max_cpu_s=150,
        ...                           eval_texts=held_out)
        >>> report.curve[-1]
    """
    texts = check_texts("texts", texts)
    if eval_texts is not None:
        eval_texts = check_texts("eval_texts", eval_texts)
    if max_cpu_s is not None:
        max_cpu_s = check_positive_float("max_cpu_s", max_cpu_s)
    if max_steps is not None:
        check_positive_int("max_steps", max_steps)
    if eval_every_s is not None:
        eval_every_s = check_positive_float("eval_every_s", eval_every_s)
    check_positive_int("chunk_tokens", chunk_tokens, minimum=16)
    check_positive_int("max_length", max_length, minimum=2)
    check_positive_int("output_batch", output_batch)
    check_positive_int("output_every", output_every)
    check_choice("objective", objective, ALIGN_OBJECTIVES)
    hidden_weight = check_positive_float("hidden_weight", hidden_weight, strict=False)
    lr = check_positive_float("lr", lr)
    if output_lr is None:
        output_lr = 0.0 if output_share else 0.5
    output_lr = check_positive_float("output_lr", output_lr, strict=False)
    n_old, n_new = _check_models(model, base_model, old_tokenizer, new_tokenizer)
    layers = _decoder_layers(model)
    check_positive_int("input_layer", input_layer)
    if input_layer > len(layers):
        raise ValueError(
            f"input_layer must be <= {len(layers)} (the model's layers), got {input_layer}"
        )

    cpu0, wall0 = time.process_time(), time.perf_counter()  # tokenizing counts too
    prefix = document_boundary(old_tokenizer, boundary)
    byte_ends_old = byte_ends_fn(old_tokenizer)
    byte_ends_new = byte_ends_fn(new_tokenizer)
    old_enc = old_tokenizer(texts, add_special_tokens=False).input_ids
    if any(len(ids) > max_length for ids in old_enc):  # long texts: all of them is used
        texts = _split_long(texts, lambda t: len(old_tokenizer(t, add_special_tokens=False)
                                                 .input_ids), max_length)  # fmt: skip
        old_enc = old_tokenizer(texts, add_special_tokens=False).input_ids
    new_enc = new_tokenizer(texts, add_special_tokens=False).input_ids
    if not any(i >= n_old for ids in new_enc for i in ids):
        raise ValueError(
            f"texts contain none of the {n_new - n_old:,} new tokens of new_tokenizer (ids "
            f"{n_old}..{n_new - 1}); give text in the language the extension was made for"
        )

    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out.weight is inp.weight
    device = inp.weight.device
    new_ids = torch.arange(n_old, n_new, device=device)
    w_in = inp.weight
    rows_in = nn.Parameter(w_in.detach()[n_old:].float().clone())  # (K, D)
    rows_out = rows_in if tied else nn.Parameter(out.weight.detach()[n_old:].float().clone())
    head_old = out.weight.detach()[:n_old].float().clone()  # (V_old, D), never aliases
    fit_output = tied or output_lr > 0  # else only input rows train (output rows: the share)
    lowered = None
    if output_share and not tied:
        # from the base's rows: after a share_output_rows call the same rows, not lowered twice
        share_new, lowered, share_old, _ = share_rows(
            model, old_tokenizer, new_tokenizer, texts, n_old,
            original=base_model.get_output_embeddings().weight, encoded=(old_enc, new_enc),
        )  # fmt: skip
        rows_out = nn.Parameter(share_new)
        head_old[lowered] = share_old
    bias = getattr(out, "bias", None)
    bias_old = None if bias is None else bias.detach()[:n_old].float()
    bias_new = None if bias is None else bias.detach()[n_old:].float()

    report = AlignmentReport(new_rows=n_new - n_old)
    gen = torch.Generator().manual_seed(seed)
    eval_cpu = 0.0

    def spent() -> float:
        return time.process_time() - cpu0 - eval_cpu

    def evaluate() -> None:
        nonlocal eval_cpu
        if eval_texts is None:
            return
        t = time.process_time()
        at = spent()
        value = bits_per_char(model, new_tokenizer, eval_texts, boundary=boundary)
        report.curve.append((round(at, 2), value))
        eval_cpu += time.process_time() - t
        if progress:
            print(f"  align: {at:7.1f} CPU s, eval {value:.3f} bits/char", flush=True)

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    base_model.eval()
    try:
        evaluate()
        order = sorted(range(len(texts)), key=lambda i: len(old_enc[i]))
        batches = _chunks(order, old_enc, chunk_tokens, max_length, len(prefix))
        # texts of like length share a chunk (little padding); chunks come in random order
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        # output targets kept so far: final states (P, D), old log-partition (P,), next id (P,)
        H = L = Y = None
        chunks: list[_Chunk] = []
        # input rows = own row + a map shared by all new tokens of what the base computed
        # from their pieces alone (context-free, after input_layer layers): every occurrence
        # of any new token trains the map, so rare and unseen tokens learn too
        shared = None
        if shared_map and not tied:
            pieces_c = _piece_states(base_model, old_tokenizer, new_tokenizer, n_old, prefix,
                                     input_layer)  # fmt: skip
            shared = nn.Parameter(torch.zeros(pieces_c.shape[1], pieces_c.shape[1], device=device))
        groups = [{"params": [rows_in], "lr": lr}]
        if shared is not None:
            groups.append({"params": [shared], "lr": lr / math.sqrt(shared.shape[0])})
        opt_in = torch.optim.Adam(groups)

        def input_rows() -> Tensor:
            return rows_in if shared is None else rows_in + pieces_c @ shared.t()  # (K, D)

        opt_out = None  # made after the first teacher pass, which sets its scale
        step, pass_no = 0, 0
        default_passes = 2 if (max_steps is None and max_cpu_s is None) else None
        next_eval = eval_every_s
        while True:
            if pass_no == 0 and step < len(batches):
                chunk, (h, lse, y) = _teacher(
                    base_model, batches[step], old_enc, new_enc, prefix, byte_ends_old,
                    byte_ends_new, input_layer, max_length,
                    objective == "hidden" and step % output_every == 0 and fit_output,
                    head_old, bias_old,
                )  # fmt: skip
                chunks.append(chunk)
                if H is None:
                    H, L, Y = h, lse, y
                elif len(y):  # concatenated once per teacher pass, not once per step
                    H, L, Y = torch.cat([H, h]), torch.cat([L, lse]), torch.cat([Y, y])
                report.teacher_tokens += int(
                    sum(len(old_enc[i][:max_length]) for i in batches[step])
                )
                if opt_out is None and not tied and len(h) and fit_output:
                    # plain SGD on the summed loss, scaled so that one occurrence moves its
                    # logit by about output_lr nats: Adam would move every row (the partition
                    # gives each a tiny gradient) by a full step and sink all new tokens
                    opt_out = torch.optim.SGD(
                        [rows_out], lr=output_lr / float(h.pow(2).sum(-1).mean())
                    )
                if step == 0 and max_cpu_s is not None and spent() > max_cpu_s:
                    raise ValueError(
                        f"max_cpu_s={max_cpu_s} is too small to run one alignment step: the "
                        f"first teacher pass alone took {spent():.1f} CPU s (chunk_tokens="
                        f"{chunk_tokens}); the model is unchanged; give more CPU seconds or "
                        "fewer chunk_tokens"
                    )
            chunk = chunks[step % len(chunks)] if pass_no else chunks[-1]
            opt_in.zero_grad(set_to_none=True)
            if opt_out is not None:
                opt_out.zero_grad(set_to_none=True)
            if objective == "lm":
                loss_out, loss_in, mean_h2, n_tok = _lm_losses(
                    model,
                    inp,
                    out,
                    layers,
                    input_layer,
                    chunk,
                    input_rows(),
                    rows_out,
                    new_ids,
                    tied,
                )
                (loss_out + hidden_weight * loss_in).backward()
                if not tied:
                    if opt_out is None:
                        opt_out = torch.optim.SGD([rows_out], lr=0.0)
                    # the summed loss's step (see below), from the mean's gradient
                    opt_out.param_groups[0]["lr"] = output_lr * n_tok / mean_h2
            else:
                loss_in = _input_loss(model, inp, layers, input_layer, chunk, input_rows(), new_ids)
                loss_in.backward()
                if len(Y):
                    loss_out = _output_loss(H, L, Y, head_old, bias_old, rows_out, bias_new,
                                            n_old, output_batch, gen)  # fmt: skip
                    (loss_out * (1.0 if tied else min(len(Y), output_batch))).backward()
                else:
                    loss_out = torch.zeros(())
            opt_in.step()
            if opt_out is not None:
                opt_out.step()
            loss_in, loss_out = loss_in.item(), loss_out.item()
            with torch.no_grad():  # a completed step: write the rows into the model
                inp.weight[n_old:] = input_rows().detach().to(inp.weight.dtype)
                if not tied:
                    out.weight[n_old:] = rows_out.detach().to(out.weight.dtype)
                if lowered is not None and step == 0:
                    out.weight[lowered] = head_old[lowered].to(out.weight.dtype)
            step += 1
            report.steps = step
            report.losses.append((step, loss_out / math.log(2), loss_in))
            if progress:
                bits = loss_out / math.log(2)
                print(f"  align step {step}: {spent():.1f} CPU s, output {bits:.3f} bits/token, "
                      f"input {loss_in:.4f}", flush=True)  # fmt: skip
            if pass_no == 0 and step >= len(batches):
                pass_no = 1
            if next_eval is not None and spent() >= next_eval:
                evaluate()
                next_eval += eval_every_s
            if max_steps is not None and step >= max_steps:
                break
            if max_cpu_s is not None and spent() >= max_cpu_s:
                break
            if default_passes is not None and step >= default_passes * len(batches):
                break
        seen = torch.cat([c.new_ids[c.new_mask.bool()] for c in chunks])
        report.seen_rows = int(torch.unique(seen[seen >= n_old]).numel())
        report.cpu_s = round(spent(), 2)
        report.wall_s = round(time.perf_counter() - wall0, 2)
        if not report.curve or report.curve[-1][0] != round(spent(), 2):
            evaluate()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return report
