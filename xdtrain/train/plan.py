"""Where a worker stands in its program, and how that position moves: pure functions over
`EngineState`, the same on every worker, saved in every checkpoint (so a resume continues
mid-phase, mid-round, mid-step).

Position: phase -> round -> step (index in the round) -> iterations done in that step (or, for a
step that counts epochs, epochs of its main stream done). Two events move it:

* an iteration finished (`after_iteration`): a `repeat` step that has run its count hands over to
  the next step; a phase with an `iterations` limit may end;
* every worker found the current step's main stream dry (`after_stream_epoch`): an `epochs` step
  may hand over; the phase's main stream finishing a pass is a phase epoch.

Both return what the worker must do next: nothing, a phase epoch (validate, checkpoint, maybe end
the phase), or a phase end (after its last iteration).
"""

from __future__ import annotations

from enum import Enum

from xdtrain.nn.program import Phase, Program, Step, counts_rounds, resolve_program
from xdtrain.train.config import LoopConfig


def program_for(model: object, t: LoopConfig) -> Program:
    """The model's training program with the `train:` section's values filled in, checked
    (ValueError names what is wrong)."""
    return resolve_program(model, batch_size=t.batch_size, epochs=t.epochs, patience=t.patience, lr=t.lr,
                           betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)


class Event(Enum):
    NONE = 0
    PHASE_EPOCH = 1  # a pass of the phase's main stream, or a round when steps count epochs
    PHASE_ITERATIONS = 2  # the phase ran its `iterations`


def current(prog: Program, state) -> tuple[Phase, Step]:
    phase = prog.phases[state.phase]
    return phase, phase.steps[state.step_index]


def _next_step(phase: Phase, state) -> bool:
    """Hand over to the next step; True when that closes a round."""
    state.step_iter = state.step_epochs = 0
    state.step_index += 1
    if state.step_index < len(phase.steps):
        return False
    state.step_index = 0
    state.round += 1
    return True


def after_iteration(prog: Program, state) -> Event:
    phase, step = current(prog, state)
    state.step_iter += 1
    state.phase_iter += 1
    round_done = False
    if not step.epochs and state.step_iter >= step.repeat:
        round_done = _next_step(phase, state)
    if phase.iterations and state.phase_iter >= phase.iterations:
        return Event.PHASE_ITERATIONS
    if round_done and counts_rounds(phase):
        return Event.PHASE_EPOCH
    return Event.NONE


def after_stream_epoch(prog: Program, state) -> Event:
    """Every worker's copy of the current step's main stream ran dry (its epoch ended)."""
    phase, step = current(prog, state)
    if step.epochs:
        state.step_epochs += 1
        if state.step_epochs >= step.epochs and _next_step(phase, state):
            return Event.PHASE_EPOCH
        return Event.NONE
    if not counts_rounds(phase) and prog.main_stream(step) == prog.main_stream(phase.steps[0]):
        return Event.PHASE_EPOCH
    return Event.NONE


def enter_next_phase(prog: Program, state) -> bool:
    """Move to the start of the next phase; False when this was the last one."""
    if state.phase + 1 >= len(prog.phases):
        return False
    state.phase += 1
    state.step_index = state.step_iter = state.step_epochs = state.round = 0
    state.phase_epoch = state.phase_iter = state.bad_validations = 0
    return True


def next_position(prog: Program, state) -> tuple[int, int] | None:
    """(phase, step index) of the next iteration when no stream runs dry before it, or None when
    that iteration could start another phase (no read-ahead across phase boundaries)."""
    phase, step = current(prog, state)
    if phase.iterations and state.phase_iter + 1 >= phase.iterations:
        return None
    if step.epochs or state.step_iter + 1 < step.repeat:
        return state.phase, state.step_index
    return state.phase, (state.step_index + 1) % len(phase.steps)
