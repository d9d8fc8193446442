"""Datasets over other datasets: blend, mix, concat, epochize, map."""
