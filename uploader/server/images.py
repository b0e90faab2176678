"""The images of one server: the parts that make and fill them, put together.

- uploader/server/lifecycle.py: create, read, replace, delete (the control API's side);
- uploader/server/upload_sessions.py: what the upload URLs ask (admit, receive, state);
- uploader/server/imports.py: imports and copies, and images read by them;
- uploader/server/transfers.py: the transfer that fills an image, its progress and outcome;
- uploader/server/recovery.py: the images after a restart, and uploads that never came;
- uploader/server/image_states.py: every phase change, in the status, tokens and store.
"""

from __future__ import annotations

import asyncio

from importer.metrics import Metrics
from uploader.server.checkpoints import Checkpoints
from uploader.server.config import ServerConfig
from uploader.server.data_sources import SourcePlanner
from uploader.server.destinations import Storage
from uploader.server.image_db import Store
from uploader.server.image_states import ImageStates
from uploader.server.imports import Imports, ReadLocks
from uploader.server.lifecycle import ImageLifecycle
from uploader.server.recovery import Recovery
from uploader.server.transfers import Transfers
from uploader.server.upload_sessions import UploadSessions
from uploader.server.upload_tokens import UploadTokens


class Images:
    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        metrics: Metrics,
        storage: Storage | None = None,
    ) -> None:
        """`storage`: where the images' data goes, when not the server's own (the uploader
        pod pushes its one image to a reference it is given, uploader/pod/)."""
        self.config = config
        self.store = store
        self.storage = storage if storage is not None else Storage(config)
        tokens = UploadTokens()
        states = ImageStates(store, tokens)
        checkpoints = Checkpoints(store, self.storage)
        self.transfers = Transfers(config, states, self.storage, checkpoints, metrics)
        locks = ReadLocks()
        planner = SourcePlanner(config, store, self.storage)
        self.imports = Imports(states, self.storage, planner, self.transfers, locks)
        self.lifecycle = ImageLifecycle(
            config,
            store,
            states,
            tokens,
            self.storage,
            self.transfers,
            self.imports,
            locks,
            metrics.forget,
        )
        self.uploads = UploadSessions(
            config, states, tokens, self.storage, self.transfers, checkpoints
        )
        self.recovery = Recovery(
            store, states, tokens, self.storage, checkpoints, self.transfers, self.lifecycle
        )
        self._locks = locks
        self._expirer: asyncio.Task[None] | None = None

    async def start(self, own_base_url: str) -> None:
        """Sets the upload URL bases and brings every stored image back to a steady state."""
        self.lifecycle.set_upload_bases(
            self.config.external_url or own_base_url,
            self.config.in_cluster_url or own_base_url,
        )
        await self.recovery.recover_all()
        timeout = self.config.wait_for_upload_timeout
        if timeout > 0:
            self._expirer = asyncio.create_task(self.recovery.expire_waiting_uploads(timeout))

    async def stop(self) -> None:
        """Ends every transfer; their images stay as they are and resume on start."""
        if self._expirer is not None:
            self._expirer.cancel()
        await self.transfers.stop()
        await self.imports.stop()
        await self.transfers.wait_all(30)
        tasks = [*self.imports.tasks, *self._locks.background]
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        await self.storage.close()
