"""How an alert reaches someone: the durable outbox, routing, Block Kit rendering and the
Slack (or console) sender. Knows the alert model, never the rules that fire alerts.
"""
