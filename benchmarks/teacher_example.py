"""What the teacher says at the positions where a name is due, with and without an example.

On-policy distillation only asks the teacher about positions the student reaches. For identity
("Your name is Kuro, …") the student must reach `' K'` and then `'uro'`. This prints, for each
greeting prompt and each student prefix (`I'm`, `I'm K`, `My name is`, `My name is K`, and the
student's own greedy opening), the teacher's probability of the next name token and its top
tokens, under the hindsight prompt with the feedback alone and with the feedback plus an
example answer (`FeedbackItem.example`). The ratio of the two probabilities, per row, is the
figure: it says whether the example gives the student's positions the signal the feedback alone
does not. Then each prompt's greedy answers: the student's, and the teacher's under either
prompt (where on-policy distillation can lead the student: a student that never opens with an
introduction never reaches the positions above).

    .venv/bin/python benchmarks/teacher_example.py [--model SmolLM2-135M-Instruct]

The teacher here is the base model (an adapter's first version equals it: LoRA's B starts at 0).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from claas.eval.preferences import load_preference
from claas.models import load_model
from claas.sdpo.prompts import chat_prompt_tokens, teacher_prompt_tokens
from claas.settings import EMBEDDED_MODEL, Settings

EXAMPLE = "Hi! I'm Kuro, your assistant. How can I help you today?"
NAME_TOKENS = [(" K", ["I'm", "My name is"]), ("uro", ["I'm K", "My name is K"])]


def next_token_distribution(model: Any, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([tokens])).logits[0, -1].float()
    return logits.log_softmax(-1).exp()


def greedy(model: Any, tokenizer: Any, tokens: list[int], length: int = 12) -> str:
    with torch.inference_mode():
        answer = model.generate(torch.tensor([tokens]), max_new_tokens=length, do_sample=False)
    return str(tokenizer.decode(answer[0, len(tokens) :], skip_special_tokens=True))


def top(tokenizer: Any, probs: torch.Tensor, k: int = 4) -> str:
    values, ids = probs.topk(k)
    return ", ".join(
        f"{tokenizer.decode([int(i)])!r} {float(v):.2f}" for v, i in zip(values, ids, strict=False)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--prompts", type=int, default=6, help="identity training prompts")
    args = parser.parse_args()
    loaded = load_model(args.model, Settings().model_cache_dir, "cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    identity = load_preference("identity")
    feedback = identity.feedback
    print(f"feedback: {feedback!r}\nexample:  {EXAMPLE!r}\n")
    header = (
        "| prompt | student prefix | next | P alone | P with example | ratio | top with example |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|")
    ratios: list[float] = []
    for prompt in identity.training_prompts[: args.prompts]:
        messages = [{"role": "user", "content": prompt}]
        student = chat_prompt_tokens(tokenizer, messages)
        with torch.inference_mode():
            opening = model.generate(torch.tensor([student]), max_new_tokens=4, do_sample=False)[
                0, len(student) :
            ]
        own = tokenizer.decode(opening, skip_special_tokens=True)
        alone = teacher_prompt_tokens(tokenizer, messages, feedback)
        shown = teacher_prompt_tokens(tokenizer, messages, feedback, example=EXAMPLE)
        for token, prefixes in NAME_TOKENS:
            (token_id,) = tokenizer.encode(token, add_special_tokens=False)
            for prefix in [*prefixes, *([own] if token == " K" else [])]:
                response = tokenizer.encode(prefix, add_special_tokens=False)
                p_alone = float(next_token_distribution(model, alone + response)[token_id])
                with_example = next_token_distribution(model, shown + response)
                p_shown = float(with_example[token_id])
                ratio = p_shown / max(p_alone, 1e-12)
                ratios.append(ratio)
                print(
                    f"| {prompt} | {prefix!r} | {token!r} | {p_alone:.3f} | {p_shown:.3f} "
                    f"| {ratio:.1f}x | {top(tokenizer, with_example)} |"
                )
    print("\n| prompt | student greedy | teacher greedy, feedback alone | … with example |")
    print("|---|---|---|---|")
    for prompt in identity.training_prompts[: args.prompts]:
        messages = [{"role": "user", "content": prompt}]
        answers = [
            greedy(model, tokenizer, tokens)
            for tokens in (
                chat_prompt_tokens(tokenizer, messages),
                teacher_prompt_tokens(tokenizer, messages, feedback),
                teacher_prompt_tokens(tokenizer, messages, feedback, example=EXAMPLE),
            )
        ]
        print(f"| {prompt} | " + " | ".join(repr(a) for a in answers) + " |")
    ratios.sort()
    print(
        f"\nmedian ratio P(name token | with example) / P(… | feedback alone): "
        f"{ratios[len(ratios) // 2]:.1f}x over {len(ratios)} positions"
    )


if __name__ == "__main__":
    main()
