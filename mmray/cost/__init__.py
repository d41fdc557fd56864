"""Dollars: the price table, the cost meter (a Ray actor on the head), the budget guard and the planner.

``prices`` and ``budget`` and ``planner`` import neither Ray nor torch at module level; ``meter`` needs Ray only to
run as an actor.
"""
