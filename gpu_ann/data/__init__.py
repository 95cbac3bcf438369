"""Reading rating tables into :class:`RatingsTable`."""

from gpu_ann.data.table import DataError, RatingsTable, ReadSummary

__all__ = ["DataError", "RatingsTable", "ReadSummary"]
