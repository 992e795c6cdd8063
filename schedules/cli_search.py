"""``stepsmith search`` (placeholder until schedule search lands)."""


def register(sub) -> None:
    p = sub.add_parser("search", help="(in progress) search a timestep table")
    p.set_defaults(func=_todo)


def _todo(args) -> None:
    from schedules.io import StepsmithError

    raise StepsmithError("stepsmith search is not available in this version yet")
