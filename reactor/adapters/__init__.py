"""Adapters: the ports implemented against MongoDB, SMTP, Twilio and the system clock."""
