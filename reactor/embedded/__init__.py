"""Embedded stand-ins for the services the reactor talks to: MongoDB, an SMTP sink and Twilio."""
