"""Personal accounts: named people and system clients, their roles, passwords and API tokens
(``service``), stored in the node's database (``tables``)."""
