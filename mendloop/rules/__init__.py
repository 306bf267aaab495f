"""Event → playbook routing: decides, never acts. (The storm decision is `domain.storm`.)"""
