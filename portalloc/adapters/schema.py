"""The allocation object's schema for the HTTP API and the MCP tools, built from its one
definition, models.AllocationJSON (each field's name, type and meaning): a field added
there is in both, described as it is there."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model

from portalloc import models


def _fields() -> dict[str, Any]:
    # models.py names Annotated and HeldWhile for type checkers only: supplied here.
    hints = get_type_hints(
        models.AllocationJSON,
        localns={"Annotated": Annotated, "HeldWhile": Literal[models.HELD_WHILE]},
        include_extras=True,
    )
    return {
        name: (hint.__origin__, Field(description=hint.__metadata__[0]))
        for name, hint in hints.items()
    }


if TYPE_CHECKING:

    class Allocation(BaseModel):
        """A type checker sees a model whose fields are known at run time."""

        def __getattr__(self, name: str) -> Any: ...

else:
    Allocation = create_model(
        "Allocation",
        # Each named port of the profile adds `<name>_port`: fields no class can list.
        __config__=ConfigDict(extra="allow"),
        __doc__="A lease; each named port of the profile adds a `<name>_port` field "
        "(db_port, ...).",
        **_fields(),
    )
