"""``stepsmith eval`` (placeholder until the evaluation module lands)."""


def register(sub) -> None:
    p = sub.add_parser("eval", help="(in progress) score tables: FID/KID/Wasserstein across NFE")
    p.set_defaults(func=_todo)


def _todo(args) -> None:
    from schedules.io import StepsmithError

    raise StepsmithError("stepsmith eval is not available in this version yet")
