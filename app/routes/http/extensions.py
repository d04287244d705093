"""Typed access to what create_app puts on the app: the services a route calls, and the settings."""
from __future__ import annotations

from flask import current_app

from app.services.arena.service import ArenaService
from app.services.engine.service import ModelService
from app.services.engine.slots import CompareSlots, EnginePool
from app.services.evals.service import EvalService
from app.services.system.monitor import SystemMonitor
from config.settings import LimitSettings, Settings


def settings() -> Settings:
    return current_app.config["SETTINGS"]


def limit_settings() -> LimitSettings:
    return settings().limits


def model_service() -> ModelService:
    return current_app.extensions["model_service"]


def engine_pool() -> EnginePool:
    return current_app.extensions["engine_pool"]


def compare_slots() -> CompareSlots:
    return current_app.extensions["compare_slots"]


def eval_service() -> EvalService:
    return current_app.extensions["eval_service"]


def arena() -> ArenaService:
    return current_app.extensions["arena"]


def system_monitor() -> SystemMonitor:
    return current_app.extensions["system_monitor"]
