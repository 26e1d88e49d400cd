"""The model card (``README.md``) of an export: what the model is and how to use it without fedpdpo.

A card is for a reader who got the directory and nothing else: which client, algorithm, run and data it comes from
and how well it did (the run's ``summary.json``), which base model it needs and how those weights differ from the
ones on the Hugging Face Hub, and code that loads it with plain transformers + PEFT and builds prompts exactly as
training did. The YAML header follows the Hub's model-card metadata (``library_name``, ``base_model``, ``tags``).
Rendering is pure: :func:`render_card` takes the facts :mod:`fedpdpo.export` collected and returns text.
"""

from __future__ import annotations

from typing import Any

#: The placeholder standing for the user's text in the rendered prompt example.
PROMPT = "PROMPT"

MODULES = {
    "head": "personalized LM head (replaces the backbone's output head)",
    "reward_head": "explicit reward head r(x, y) (a scorer, not part of any causal LM)",
    "adapter": "gated bottleneck adapter on the last hidden state",
}


def _pct(value: Any) -> str:
    return f"{100 * value:.1f} %" if isinstance(value, int | float) else "-"


def _front_matter(info: dict[str, Any]) -> list[str]:
    hub_id = info["base_model"]["hub_id"]
    lines = ["---", "library_name: peft"]
    if hub_id:
        lines.append(f"base_model: {hub_id}")
    lines += [
        "pipeline_tag: text-generation",
        "tags:",
        *[f"- {t}" for t in ("fedpdpo", "dpo", "lora", "federated-learning", "personalization")],
        "---",
        "",
    ]
    return lines


def _what(info: dict[str, Any], run: dict[str, Any]) -> list[str]:
    cfg, client, summary = run.get("config") or {}, run.get("client") or {}, run.get("summary") or {}
    data = cfg.get("data") or {}
    files = [p.rsplit("/", 1)[-1] for p in [data.get("path", ""), *data.get("extra_paths", [])] if p]
    conflict = client.get("conflict")
    role = " (a client with swapped preferences: it prefers the rejected side of the data)" if conflict else ""
    modules = [f"{MODULES.get(m, m)}" for m in info["local_module_groups"]]
    own = f" plus this client's own modules, which never left it: {'; '.join(modules)}" if modules else ""
    lines = [
        f"Client {info['client']}'s model from a federated preference-alignment run of "
        f"fedpdpo (algorithm `{info['algorithm']}`): a LoRA adapter shared by all clients "
        f"(trained with DPO on each client's pairs, averaged on the server){own}.",
        "",
        "| | |",
        "|---|---|",
        f"| client | {info['client']}{role} |",
        f"| algorithm | `{info['algorithm']}` |",
        f"| run | `{info['run_name']}`: seed {cfg.get('seed')}, {cfg.get('num_clients')} clients, "
        f"rounds {cfg.get('rounds')} x {cfg.get('local_steps')} local steps x batch {cfg.get('batch_size')}, "
        f"lr {cfg.get('lr')}, DPO beta {info['beta']} |",
        f"| data | {', '.join(files) or '-'}; partition `{(cfg.get('partition') or {}).get('method')}`"
        + (
            f"; this client: {client['n_train']} training / {client['n_test']} held-out pairs"
            if "n_train" in client and "n_test" in client
            else ""
        )
        + (f", domains {', '.join(client['domains'])}" if client.get("domains") else "")
        + " |",
    ]
    if isinstance(client.get("accuracy"), int | float):
        variants = ", ".join(
            f"{k.removeprefix('accuracy_')} {_pct(client[k])}"
            for k in ("accuracy_implicit", "accuracy_explicit", "accuracy_combined")
            if k in client
        )
        lines.append(
            f"| held-out preference accuracy | {_pct(client.get('accuracy'))} after round "
            f"{client.get('selected_round', summary.get('rounds'))} of {summary.get('rounds')} "
            f"(by score `{summary.get('eval_score')}`; {variants}); {_pct(summary.get('mean_accuracy_round0'))} "
            f"before training; mean over all clients {_pct(summary.get('mean_accuracy'))} |"
        )
    else:
        lines.append("| held-out preference accuracy | not recorded (the run has no readable summary.json) |")
    lines += [
        "",
        "Accuracy is the share of the client's held-out pairs (prompt, chosen, rejected) in which the model scores "
        "the chosen response above the rejected one; ties count half, so 50 % is chance.",
        "",
    ]
    return lines


def _base(info: dict[str, Any]) -> list[str]:
    base = info["base_model"]
    name = f"`{base['hub_id']}`" if base["hub_id"] else f"`{info['model']}` (no Hugging Face Hub id known)"
    lines = ["## Base model", "", f"{name}: {base['weights']}.", ""]
    if info["base_dir"]:
        lines.append(
            f"These exact weights are saved in `{info['base_dir']}/`, and `adapter_config.json` names them by the "
            f"relative path `{info['base_dir']}`, so the directory can be moved or copied and still loads offline."
        )
    elif base["hub_id"]:
        lines.append(
            f"`adapter_config.json` names the base by its Hub id `{base['hub_id']}`. Loaded on the Hub's weights the "
            "adapter computes close to, but not exactly, what it computed in training; export with "
            "`fedpdpo export --save-base` to carry the exact base weights in the directory."
        )
    else:
        lines.append(
            f"`adapter_config.json` names the base as `{info['peft_base']}`, which exists on the machine that "
            "exported it; export with `fedpdpo export --save-base` to carry the base weights in the directory."
        )
    return [*lines, ""]


def _files(info: dict[str, Any]) -> list[str]:
    rows = [
        ("adapter_config.json, adapter_model.safetensors", "the shared LoRA, a standard PEFT adapter"),
        ("fedpdpo_client.json", "settings to rebuild the client's model: LoRA, modules, beta, length limits"),
        (
            "tokenizer files",
            "the backbone's tokenizer" + (", chat template included" if info["prompt"]["chat_template"] else ""),
        ),
    ]
    if info["local_modules"]:
        rows.append(("local_modules.safetensors", "this client's own modules (see above)"))
    if info["base_dir"]:
        rows.append((f"{info['base_dir']}/", "the base model (transformers `save_pretrained`)"))
    if info["merged"]:
        rows.append(("merged/", f"a plain causal LM: the {info['merged']} policy (see above)"))
    return ["## Files", "", "| file | what |", "|---|---|", *[f"| `{f}` | {w} |" for f, w in rows], ""]


def _loading(info: dict[str, Any]) -> list[str]:
    prompt = info["prompt"]
    end = prompt["end_token"]
    if info["base_dir"]:
        load = [
            f'base = AutoModelForCausalLM.from_pretrained(f"{{adir}}/{info["base_dir"]}")',
            "model = PeftModel.from_pretrained(base, adir).eval()",
        ]
        auto = (
            f"PEFT and transformers resolve the relative base path `{info['base_dir']}` against the working "
            'directory, so `AutoPeftModelForCausalLM.from_pretrained(".")` works from inside this directory; the '
            "code above works from anywhere."
        )
    else:
        load = [
            f'base = AutoModelForCausalLM.from_pretrained("{info["peft_base"]}")',
            "model = PeftModel.from_pretrained(base, adir).eval()",
        ]
        auto = "`AutoPeftModelForCausalLM.from_pretrained(adir)` loads the same base by the name above."
    if prompt["chat_template"]:
        build = [
            "    messages = [{'role': 'user', 'content': question}]",
            "    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
            "    return tokenizer(text, add_special_tokens=False).input_ids",
        ]
        how = (
            "Training rendered every prompt with the tokenizer's chat template, system turn included, and the "
            "generation prompt that opens the assistant turn:"
        )
    else:
        start = f"{list(prompt['head_ids'])} + " if prompt["head_ids"] else ""
        build = [f"    return {start}tokenizer(question, add_special_tokens=False).input_ids"]
        how = "The tokenizer has no chat template: a prompt is " + (
            "its special start tokens followed by the text:" if prompt["head_ids"] else "the text itself:"
        )
    return [
        "## Use it with transformers + PEFT (no fedpdpo needed)",
        "",
        "This loads the **global** policy: base model + shared LoRA, with the base model's own output head.",
        "",
        "```python",
        "import torch",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'adir = "path/to/this/directory"',
        "tokenizer = AutoTokenizer.from_pretrained(adir)",
        *load,
        f"end_id = tokenizer.convert_tokens_to_ids({end!r})  # closes every response in training",
        "",
        "",
        "def prompt_ids(question: str) -> list[int]:",
        *build,
        "",
        "",
        "@torch.no_grad()",
        "def response_logprob(question: str, response: str) -> float:",
        '    """Summed log-probability of ``response`` (closed by the end-of-turn token) after ``question``."""',
        "    prompt = prompt_ids(question)",
        "    answer = tokenizer(response, add_special_tokens=False).input_ids + [end_id]",
        "    ids = torch.tensor([prompt + answer])",
        "    logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)",
        "    targets = ids[0, 1:]",
        "    token_logps = logps.gather(1, targets[:, None])[:, 0]",
        "    return float(token_logps[len(prompt) - 1 :].sum())",
        "",
        "",
        "ids = torch.tensor([prompt_ids('Write a short review of the movie.')])",
        "out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,",
        "                     eos_token_id=end_id)",
        "print(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))",
        "```",
        "",
        auto,
        "",
        "### Prompts as in training",
        "",
        how,
        "",
        "```text",
        prompt["example"],
        "```",
        "",
        f"`{PROMPT}` stands for the user's text. A response is its text followed by `{end}`, the token that ends "
        "the assistant turn: stop generating there. Training limited this client's prompts to "
        f"{info['max_prompt_length']} tokens and prompt + response to {info['max_length']} tokens (chosen from its "
        "data, in `fedpdpo_client.json`): a longer prompt lost tokens from the start of the user's text, never "
        "from the template, and a longer response was cut at its end. Within those limits the ids above are "
        "exactly the ones training used.",
        "",
    ]


def _personalized(info: dict[str, Any]) -> list[str]:
    lines = ["## The client's personalized model", ""]
    if info["local_modules"]:
        lines += [
            "The personalized policy puts this client's modules on top of the global one (backbone + shared LoRA "
            "-> adapter -> personalized head) and adds its explicit reward head. A plain causal LM cannot hold the "
            "adapter or the reward head; fedpdpo rebuilds the whole client model:",
            "",
        ]
    else:
        lines += ["This client has no local modules: the global policy above is its whole model. With fedpdpo:", ""]
    lines += [
        "```python",
        "import fedpdpo",
        "",
        'client = fedpdpo.load_personalized("path/to/this/directory")',
        "client.model, client.tokenizer  # the FedPDPOModel (log-probs and explicit rewards) and its tokenizer",
        "```",
        "",
        "or from the command line: `fedpdpo generate --from DIR --prompt ...` and `fedpdpo score --from DIR ...`.",
        "",
    ]
    if info["merged"] == "global":
        lines += [
            "**`merged/` is the global policy, not this client's personalized one.** The LoRA is merged into the "
            "weights, but the client's bottleneck adapter sits between the last hidden state and the head and has no "
            "place in a standard causal LM, so `AutoModelForCausalLM.from_pretrained('merged')` computes what every "
            "client shares. Use `fedpdpo.load_personalized` for this client's own model.",
            "",
        ]
    elif info["merged"] == "personalized":
        lines += [
            "`merged/` is this client's personalized policy as a plain causal LM "
            "(`AutoModelForCausalLM.from_pretrained`): the LoRA merged into the weights and the personalized head "
            "as its output head (untied from the input embeddings). The explicit reward head is a scorer and is not "
            "part of it.",
            "",
        ]
    return lines


def render_card(info: dict[str, Any], run: dict[str, Any]) -> str:
    """The card of an export. ``info``: the export's ``fedpdpo_client.json`` plus ``base_model`` (hub id and
    weights), ``prompt`` (chat template, rendered example, end token), ``peft_base`` (what adapter_config.json
    names) and ``local_module_groups``; ``run``: the run's ``config`` (config.toml as a dict), ``summary`` and this
    ``client``'s entry of summary.json (each may be empty when the run has none)."""
    title = f"# fedpdpo client {info['client']} of run `{info['run_name']}` ({info['algorithm']})"
    lines = [
        *_front_matter(info),
        title,
        "",
        *_what(info, run),
        *_base(info),
        *_loading(info),
        *_personalized(info),
        *_files(info),
    ]
    return "\n".join(lines).rstrip() + "\n"
