"""Event → playbook routing and storm control: decides, never acts."""
