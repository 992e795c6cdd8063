"""``stepsmith distill`` (placeholder until the distillation trainer lands)."""


def register(sub) -> None:
    p = sub.add_parser("distill", help="(in progress) straighten a flow (BOSS, reflow, k-step)")
    p.set_defaults(func=_todo)


def _todo(args) -> None:
    from schedules.io import StepsmithError

    raise StepsmithError("stepsmith distill is not available in this version yet")
