//! DynamoDB Local launcher (being written).
