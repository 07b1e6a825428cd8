"""``EXP/pipeline.json``: a pipeline's settings, the stages it has done with their outputs, and
the inputs each stage ran on.

Stage outputs that are paths are stored relative to the experiment folder, so a copied or moved
experiment resumes, reports and writes in its new place. A stage whose inputs differ from those it
ran on is redone, and so is every stage after it (a new final ensemble gets a new submission).
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import RayscError
from ..experiment import Experiment, settings_changes
from ..fileio import write_json


class PipelineState:
    """The stages done so far of the pipeline in ``exp``, with ``settings`` it must keep.

    Args:
        exp: the experiment folder.
        settings: what the pipeline runs with; a stored pipeline with others is refused.
        defaults: the value of a setting that an older ``pipeline.json`` does not hold.

    Raises:
        RayscError: the folder holds a pipeline with other settings.
    """

    def __init__(self, exp: Experiment, settings: dict[str, Any], defaults: dict[str, Any]) -> None:
        self.path = exp.pipeline_state
        self.done: dict[str, Any] = {}
        self.inputs: dict[str, Any] = {}
        self.order: list[str] = []  # the stages in the order they were done (the file sorts its keys)
        if self.path.is_file():
            stored = json.loads(self.path.read_text())
            changes = settings_changes(stored["settings"], settings, defaults)
            if changes:
                raise RayscError(
                    f"{exp.root} holds a pipeline with other settings ({changes}); continue it with its own "
                    "settings, or use another --experiment"
                )
            self.done = stored["done"]
            self.inputs = stored.get("inputs", {})  # none before raysc recorded them: nothing to compare
            self.order = stored.get("order", list(self.done))
        self.settings = settings
        self.save()

    def save(self) -> None:
        state = {"settings": self.settings, "done": self.done, "inputs": self.inputs, "order": self.order}
        write_json(self.path, state)

    def mark(self, stage: str, output: Any, inputs: dict[str, Any] | None) -> None:
        """``stage`` is done with ``output``, having run on ``inputs``."""
        self.done[stage] = output
        self.order = [*(name for name in self.order if name != stage), stage]
        if inputs is not None:
            self.inputs[stage] = inputs
        self.save()

    def changed(self, stage: str, inputs: dict[str, Any] | None) -> str:
        """How ``inputs`` differ from those ``stage`` ran on, as text ('' when they do not, or
        when either is unknown)."""
        ran_on = self.inputs.get(stage)
        if inputs is None or ran_on is None:
            return ""
        return settings_changes(ran_on, inputs)

    def forget_from(self, stage: str) -> list[str]:
        """Forget ``stage`` and every stage done after it; returns their names."""
        gone = self.order[self.order.index(stage) :]
        self.order = self.order[: self.order.index(stage)]
        for name in gone:
            self.done.pop(name, None)
            self.inputs.pop(name, None)
        self.save()
        return gone
