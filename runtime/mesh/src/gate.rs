//! A [`NetworkBehaviour`] wrapper that keeps the wrapped protocols closed on a connection
//! until its peer is admitted.
//!
//! While a peer is not admitted, its connections' inner handlers are not polled (so they send
//! nothing: no gossip, no Kademlia answers, no requests) and the streams the peer opens to
//! them are negotiated but parked unread (at most [`MAX_PARKED_STREAMS`] per connection; the
//! rest are dropped). When [`Gate::admit`] is called, every connection of that peer opens: the
//! parked streams are handed to the inner handler and it starts running. Nothing is lost for a
//! peer that is admitted, and nothing reaches or leaves the inner protocols for one that is not.
//!
//! Parking rather than refusing the streams matters: refusing would make the remote's handler
//! conclude that the protocol is unsupported on this connection, while both sides finish the
//! admission handshake a round trip apart.

use std::collections::{HashMap, HashSet, VecDeque};
use std::task::{Context, Poll, Waker};

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, NotifyHandler, SubstreamProtocol, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};

/// Inbound streams parked per connection while its peer is not admitted.
pub const MAX_PARKED_STREAMS: usize = 32;

pub struct Gate<B: NetworkBehaviour> {
    inner: B,
    admitted: HashSet<PeerId>,
    connections: HashMap<PeerId, HashSet<ConnectionId>>,
    to_swarm: VecDeque<ToSwarm<B::ToSwarm, GateIn<THandlerInEvent<B>>>>,
    waker: Option<Waker>,
}

impl<B: NetworkBehaviour> Gate<B> {
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            admitted: HashSet::new(),
            connections: HashMap::new(),
            to_swarm: VecDeque::new(),
            waker: None,
        }
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    pub fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    /// Opens the wrapped protocols on every present and future connection of `peer`.
    pub fn admit(&mut self, peer: PeerId) {
        if !self.admitted.insert(peer) {
            return;
        }
        for id in self.connections.get(&peer).into_iter().flatten() {
            self.to_swarm.push_back(ToSwarm::NotifyHandler {
                peer_id: peer,
                handler: NotifyHandler::One(*id),
                event: GateIn::Open,
            });
        }
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Future connections of `peer` start closed. Connections already open stay open: revoke a
    /// peer by disconnecting it.
    pub fn revoke(&mut self, peer: &PeerId) {
        self.admitted.remove(peer);
    }

    pub fn is_admitted(&self, peer: &PeerId) -> bool {
        self.admitted.contains(peer)
    }

    fn track(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        handler: THandler<B>,
    ) -> GateHandler<THandler<B>> {
        self.connections.entry(peer).or_default().insert(id);
        GateHandler::new(handler, self.admitted.contains(&peer))
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for Gate<B> {
    type ConnectionHandler = GateHandler<THandler<B>>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let h =
            self.inner
                .handle_established_inbound_connection(id, peer, local_addr, remote_addr)?;
        Ok(self.track(peer, id, h))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(id, maybe_peer, addresses, effective_role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let h = self.inner.handle_established_outbound_connection(
            id,
            peer,
            addr,
            role_override,
            port_use,
        )?;
        Ok(self.track(peer, id, h))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(c) = &event
            && let Some(set) = self.connections.get_mut(&c.peer_id)
        {
            set.remove(&c.connection_id);
            if set.is_empty() {
                self.connections.remove(&c.peer_id);
            }
        }
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner.on_connection_handler_event(peer, id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        if let Some(ev) = self.to_swarm.pop_front() {
            return Poll::Ready(ev);
        }
        self.waker = Some(cx.waker().clone());
        self.inner.poll(cx).map(|ev| ev.map_in(GateIn::Inner))
    }
}

/// Events from the [`Gate`] to its handlers.
#[derive(Debug)]
pub enum GateIn<E> {
    /// The peer is admitted: start the inner handler.
    Open,
    /// An event for the inner handler.
    Inner(E),
}

type Parked<H> = FullyNegotiatedInbound<
    <H as ConnectionHandler>::InboundProtocol,
    <H as ConnectionHandler>::InboundOpenInfo,
>;

pub struct GateHandler<H: ConnectionHandler> {
    inner: H,
    open: bool,
    parked: VecDeque<Parked<H>>,
    waker: Option<Waker>,
}

impl<H: ConnectionHandler> GateHandler<H> {
    fn new(inner: H, open: bool) -> Self {
        Self {
            inner,
            open,
            parked: VecDeque::new(),
            waker: None,
        }
    }
}

impl<H: ConnectionHandler> ConnectionHandler for GateHandler<H> {
    type FromBehaviour = GateIn<H::FromBehaviour>;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = H::InboundProtocol;
    type OutboundProtocol = H::OutboundProtocol;
    type InboundOpenInfo = H::InboundOpenInfo;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.inner.listen_protocol()
    }

    fn connection_keep_alive(&self) -> bool {
        // Until admission is decided the connection is kept; the admission deadline closes it.
        !self.open || self.inner.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        if !self.open {
            self.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        while let Some(stream) = self.parked.pop_front() {
            self.inner
                .on_connection_event(ConnectionEvent::FullyNegotiatedInbound(stream));
        }
        self.inner.poll(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        if self.open {
            self.inner.poll_close(cx)
        } else {
            Poll::Ready(None)
        }
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {
            GateIn::Open => {
                self.open = true;
                if let Some(w) = self.waker.take() {
                    w.wake();
                }
            }
            // Queued by the inner handler; it acts on it once polled.
            GateIn::Inner(e) => self.inner.on_behaviour_event(e),
        }
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        match event {
            // Once open, streams still go behind the parked ones, to keep their order.
            ConnectionEvent::FullyNegotiatedInbound(stream)
                if !self.open || !self.parked.is_empty() =>
            {
                if self.open || self.parked.len() < MAX_PARKED_STREAMS {
                    self.parked.push_back(stream);
                } else {
                    tracing::debug!("dropping an inbound stream from a peer that is not admitted");
                }
            }
            other => self.inner.on_connection_event(other),
        }
    }
}
