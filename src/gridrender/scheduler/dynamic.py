"""Dynamic prompts for data sets: `{red|blue} car`, `__colors__` wildcards (the dynamicprompts library).

A prompt that uses the template syntax expands combinatorially into an axis, or, with
`prompt_samples: N`, into N variants drawn from a seed. Without a seed in the job file
the seed derives from the job's name and templates, and job.yaml records it: a
resubmit expands to the same prompts, so to the same cells.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import Problem
from .settings import Settings

if TYPE_CHECKING:  # dynamicprompts is imported where it is used: most jobs have no template
    from dynamicprompts.commands import Command, SequenceCommand, VariantCommand, WildcardCommand, WrapCommand
    from dynamicprompts.commands.variable_commands import VariableAccessCommand
    from dynamicprompts.wildcards import WildcardManager

    Variables = dict[str, Command | None]  # a sequence's variables: None for an immediate (one-valued) one

_TEMPLATE = re.compile(r"\{[^{}]*\}|__[\w./-]+__")
_SYNTAX = re.compile(r"[{}]|__|\$\{")  # a wildcard value that is a template of its own
MAX_WILDCARD_DEPTH = 20  # wildcards naming wildcards: deeper is a loop
COUNT_CAP = 10**15  # counts saturate here: enough to say how far over the limit a template is


def is_template(text: str) -> bool:
    return bool(_TEMPLATE.search(text))


def default_seed(name: str, templates: list[str]) -> int:
    return int.from_bytes(hashlib.sha256("\0".join([name, *templates]).encode()).digest()[:4], "big")


def expand(
    templates: list[str], count: int | None, seed: int, settings: Settings, limit: int | None = None
) -> tuple[list[str], list[Problem]]:
    """(prompts, problems): every template expanded, plain prompts as they are, duplicates dropped.

    Combinatorial templates are counted before they expand (`count_variants`): more than
    `limit` prompts (default: GRIDRENDER_MAX_CELLS) is a problem on the template, not an
    expansion that runs out of memory.
    """
    from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator
    from dynamicprompts.wildcards import WildcardManager

    limit = settings.max_cells if limit is None else limit
    wildcards = WildcardManager(Path(settings.wildcard_dir).expanduser() if settings.wildcard_dir else None)
    prompts: list[str] = []
    problems = []
    planned = 0  # prompts the templates so far expand to, at most
    for index, template in enumerate(templates):
        if not is_template(template):
            prompts.append(template)
            planned += 1
            continue
        missing = [w for w in re.findall(r"__([\w./-]+)__", template) if not wildcards.get_values(w)]
        if missing:
            where = settings.wildcard_dir or "GRIDRENDER_WILDCARD_DIR (not set)"
            problems.append(Problem(f"prompts.{index}", f"no wildcard file for __{missing[0]}__ in {where}"))
            continue
        try:
            if count is None:
                variants_at_most = count_variants(template, wildcards, cap=COUNT_CAP)
                planned += variants_at_most
                if planned > limit:
                    many = f"{variants_at_most:,}" if variants_at_most < COUNT_CAP else f"more than {COUNT_CAP:.0e}"
                    problems.append(
                        Problem(
                            f"prompts.{index}",
                            f"the template expands to {many} prompts; with "
                            f"the job's other prompts and axes that is over the limit of "
                            f"{settings.max_cells:,} cells (GRIDRENDER_MAX_CELLS); use "
                            "`prompt_samples: N` to draw N of them",
                        )
                    )
                    break
                variants = CombinatorialPromptGenerator(wildcards).generate(template, max_prompts=limit + 1)
            else:  # N different variants, in the order the seeded generator draws them
                # checked before drawing: count x 20 draws per template add up over many templates
                if planned + min(count, count_variants(template, wildcards, cap=count)) > limit:
                    problems.append(
                        Problem(
                            f"prompts.{index}",
                            f"prompt_samples: {count:,} more prompts put the "
                            f"job over the limit of {settings.max_cells:,} cells (GRIDRENDER_MAX_CELLS)",
                        )
                    )
                    break
                drawn = RandomPromptGenerator(wildcards, seed=seed + index).generate(template, num_images=count * 20)
                variants = list(dict.fromkeys(str(v) for v in drawn))[:count]
                planned += len(variants)
        except Exception as exc:  # noqa: BLE001  (dynamicprompts and pyparsing raise many types: each is a problem on the key)
            problems.append(Problem(f"prompts.{index}", f"cannot expand the template: {exc}"))
            continue
        prompts.extend(str(v) for v in variants)
    return list(dict.fromkeys(prompts)), problems


def count_variants(template: str, wildcards: WildcardManager, cap: int) -> int:
    """How many prompts the combinatorial generator yields for `template`, at most; never above `cap`.

    Counted on the dynamicprompts parse tree, nothing expanded: a sequence multiplies,
    `{a|b}` adds its options, `{2$$a|b|c}` (and `{1-3$$...}`) counts each ordered pick
    of distinct options as the library draws them (k! times the k-th elementary
    symmetric sum of the options' counts), a wildcard adds its values (weights repeat
    them; a value may be a template), `~`/`@` (random, cyclical) give one each. Counts
    are an upper bound: the library drops repeated picks.
    """
    from dynamicprompts.parser.config import default_parser_config
    from dynamicprompts.parser.parse import parse

    return _Counter(wildcards, cap, lambda text: parse(text, parser_config=default_parser_config)).count(template, {}, 0)


class _Counter:
    def __init__(self, wildcards: WildcardManager, cap: int, parse: Callable[[str], Command]):
        from dynamicprompts import commands as c
        from dynamicprompts.commands.variable_commands import VariableAccessCommand, VariableAssignmentCommand

        self.wildcards, self.cap, self.parse = wildcards, cap, parse
        # How each construct of the parse tree counts; the first whose type the node is answers.
        self.counters: list[tuple[type[Command], Callable[[Any, Variables, int], int]]] = [
            (c.LiteralCommand, _one),
            (c.SequenceCommand, self.sequence),
            (VariableAssignmentCommand, _one),  # counted where its sequence uses it
            (VariableAccessCommand, self.variable),
            (c.WrapCommand, self.wrap),
            (c.WildcardCommand, self.wildcard),
            (c.VariantCommand, self.variant),
        ]

    def count(self, node: Command | str, variables: Variables, depth: int) -> int:
        if isinstance(node, str):
            return self.count(self.parse(node), variables, depth) if _SYNTAX.search(node) else 1
        method = getattr(node, "sampling_method", None)  # not every command sets one
        if method is not None and method.is_nonfinite():
            return 1  # random or cyclical: one value per prompt
        for kind, count in self.counters:
            if isinstance(node, kind):
                return count(node, variables, depth)
        return self.cap  # a construct this counter does not know: assume the worst

    def sequence(self, node: SequenceCommand, variables: Variables, depth: int) -> int:
        from dynamicprompts.commands.variable_commands import VariableAssignmentCommand

        scope = dict(variables)
        for token in node.tokens:  # assignments apply to the whole sequence, as the library reads them
            if isinstance(token, VariableAssignmentCommand) and (token.overwrite or token.name not in scope):
                scope[token.name] = None if token.immediate else token.value  # immediate: one value
        total = 1
        for token in node.tokens:
            if not isinstance(token, VariableAssignmentCommand):
                total = self.capped(total * self.count(token, scope, depth))
        return total

    def variable(self, node: VariableAccessCommand, variables: Variables, depth: int) -> int:
        value = variables.get(node.name, node.default)
        return 1 if value is None else self.count(value, variables, depth)

    def wrap(self, node: WrapCommand, variables: Variables, depth: int) -> int:
        return self.capped(self.count(node.wrapper, variables, depth) * self.count(node.inner, variables, depth))

    def wildcard(self, node: WildcardCommand, variables: Variables, depth: int) -> int:
        return self.picks(self.wildcard_options(node, variables, depth), 1, 1)

    def variant(self, node: VariantCommand, variables: Variables, depth: int) -> int:
        from dynamicprompts.commands import WildcardCommand

        if len(node.values) == 1 and isinstance(node.values[0], WildcardCommand):
            options = self.wildcard_options(node.values[0], variables, depth)
        else:
            options = [self.count(v, variables, depth) for v in node.values]
        return self.picks(options, node.min_bound, node.max_bound)

    def wildcard_options(self, node: WildcardCommand, variables: Variables, depth: int) -> list[int]:
        """Per value of the wildcard (repeated by weight, as the library repeats them): its count."""
        if depth >= MAX_WILDCARD_DEPTH:
            raise ValueError(f"wildcards nest more than {MAX_WILDCARD_DEPTH} deep (a wildcard that names itself?)")
        path = node.wildcard
        if not isinstance(path, str):  # a templated path: the library takes its first expansion
            from dynamicprompts.generators import CombinatorialPromptGenerator

            # generate() hands the template to sample_prompts, which takes a parsed Command too; annotated str only
            path = CombinatorialPromptGenerator(self.wildcards).generate(path, max_prompts=1)[0]  # type: ignore[arg-type]
        options = []
        for item in self.wildcards.get_values(path).items:
            each = self.count(str(item), variables, depth + 1)
            options.append(self.capped(each * int(getattr(item, "weight", 1))))
        return options

    def picks(self, options: list[int], low: int, high: int) -> int:
        """Ordered picks of k distinct options for k in low..high, each pick the product of its options' counts."""
        high = min(high, len(options))
        low = min(low, high)
        sums = [1] + [0] * high  # sums[k]: the k-th elementary symmetric sum of the options' counts
        for option in options:
            for k in range(high, 0, -1):
                sums[k] = self.capped(sums[k] + option * sums[k - 1])
        return self.capped(sum(self.capped(math.factorial(k) * sums[k]) for k in range(low, high + 1)))

    def capped(self, n: int) -> int:
        return min(n, self.cap)


def _one(_node: Command, _variables: Variables, _depth: int) -> int:
    """A literal, or an assignment (its value counts where its sequence uses it): one prompt."""
    return 1
